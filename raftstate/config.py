"""Node configuration: a frozen dataclass that explains itself.

Sources, lowest precedence first: defaults, a TOML file, command-line flags
(``--set field=value``), then ``RAFTSTATE_<FIELD>`` environment variables.
:meth:`NodeConfig.validate` raises :class:`~raftstate.errors.ConfigError`
naming the field and the rule it broke.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftstate.admission import (
    BATCH_RPC_MAX_HEARTBEATS_LIMIT,
    DEFAULT_BATCH_RPC_MAX_HEARTBEATS,
    DEFAULT_STREAM_WINDOW,
)
from raftstate.errors import ConfigError
from raftstate.model import BATCH_HEADER_BOUND, RECORD_MAX_BYTES
from raftstate.nodekeys import decode_key
from raftstate.secretcheck import check_secret

ENV_PREFIX = "RAFTSTATE_"
_HOSTPORT = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})")
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
TRANSPORTS = ("tcp", "udp")
AUTH_MODES = ("required", "off")
REACH = ("static", "ice")
DURABILITY = ("process-crash", "fsync")
#: Upper limit of ``batch_max_bytes`` (one log entry).
BATCH_MAX_BYTES = 512 * 1024
#: pysyncobj's ``appendEntriesBatchSizeBytes`` is this many times the
#: largest entry any node may propose (``BATCH_MAX_BYTES``, not a node's own
#: ``batch_max_bytes``: nodes may differ, and a journal may hold entries from
#: before a change), so no entry is ever near the size at which pysyncobj
#: would split it into its chunked 'transmission' form.
APPEND_ENTRIES_FACTOR = 4
#: Largest command a node lets into the log: one entry of ``BATCH_MAX_BYTES``
#: plus the command's own framing (raftstate/logcommand.py).
MAX_COMMAND_BYTES = BATCH_MAX_BYTES + 1024
#: No Raft message is larger: an AppendEntries gathers entries until
#: ``APPEND_ENTRIES_BYTES`` is reached, so it ends with at most one more
#: entry; plus room for the message's own fields.
APPEND_ENTRIES_BYTES = APPEND_ENTRIES_FACTOR * BATCH_MAX_BYTES
MAX_RAFT_MESSAGE_BYTES = APPEND_ENTRIES_BYTES + MAX_COMMAND_BYTES + 64 * 1024


def append_entries_bytes() -> int:
    """pysyncobj's ``appendEntriesBatchSizeBytes``: the same on every node."""
    return APPEND_ENTRIES_BYTES


@dataclass(frozen=True, slots=True)
class Member:
    """One voting member: its id, Raft transport address and gRPC address."""

    id: str
    raft: str
    grpc: str


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one node needs. Timers are in milliseconds."""

    node_id: str = ""
    members: tuple[Member, ...] = ()
    data_dir: str = ".raftstate/node"
    #: gRPC listen address; defaults to this member's ``grpc`` address.
    grpc_listen: str = ""
    #: Raft transport listen address; defaults to this member's ``raft``
    #: address (set it when the advertised address is a NAT or port-forward).
    raft_listen: str = ""
    #: Raft transport: "udp" (our authenticated, encrypted datagram transport;
    #: needs ``cluster_secret``) or "tcp" (pysyncobj's, the baseline).
    transport: str = "udp"
    #: UDP only: how peers are reached. "static": at their ``raft`` addresses
    #: (or ``peer_raft``). "ice": through NATs, with candidates exchanged via
    #: the ``rendezvous`` service, STUN first and TURN relay as the fallback;
    #: ``raft`` addresses are then only the members' names for pysyncobj.
    reach: str = "static"
    #: UDP only: bulk data (catch-up batches, snapshots) under a NewReno
    #: window with pacing (raftstate/transport/congestion.py). Off by
    #: default: with real payloads (0-2 KiB states, 150/s) on ``bad`` the
    #: steady traffic counts as bulk, the jittery delay signal and 1-datagram
    #: growth per RTT hold the window under the offered rate, and the cluster
    #: collapsed (0-3 % of heartbeats ok vs 100 % off); see
    #: docs/architecture.md. Off leaves the in-flight cap (128 KiB per link).
    udp_congestion_control: bool = False
    #: ICE: the rendezvous service (``raftstate rendezvous``), ``host:port``.
    rendezvous: str = ""
    #: ICE: STUN server ``host:port`` (e.g. coturn).
    stun_server: str = ""
    #: ICE: TURN server ``host:port`` and long-term credentials; optional,
    #: without it peers behind symmetric NATs cannot connect.
    turn_server: str = ""
    turn_username: str = ""
    turn_password: str = ""
    #: ICE: how long one connection attempt (gather + checks) may take before
    #: the next one (direct -> relay) starts.
    ice_connect_timeout_ms: int = 5000
    #: UDP only: member id -> the ``host:port`` this node sends that peer's
    #: Raft traffic to, instead of the member's ``raft`` address (e.g. a
    #: per-link proxy; peers are identified by key, not by source address, so
    #: A->B and B->A may take different paths). TOML table ``[peer_raft]``.
    peer_raft: dict[str, str] = field(default_factory=dict)
    #: Shared secret that authenticates and encrypts node-to-node traffic.
    #: At least 128 bits estimated; generate with ``raftstate secret``.
    cluster_secret: str = ""
    #: UDP only: file holding this node's static X25519 private key
    #: (``raftstate cluster up`` writes ``nN.key``). With it every HELLO is
    #: MACed under a key only the two nodes of the pair can compute, so a
    #: member (or anyone holding the cluster secret) cannot pose as another.
    #: The file must not be readable by group or others.
    node_key_file: str = ""
    #: With ``node_key_file``: member id -> that member's public key
    #: (base64url, 32 bytes), for every other member (this node's own entry
    #: is optional and checked against its key). TOML table ``[peer_keys]``.
    peer_keys: dict[str, str] = field(default_factory=dict)
    #: ICE: the credential nodes use to authenticate to the rendezvous; must
    #: differ from ``cluster_secret`` (the rendezvous host never learns it).
    rendezvous_secret: str = ""
    #: Allow running the Raft transport without ``cluster_secret`` (tests,
    #: demos): TCP only, and only when every member's raft address (and
    #: ``raft_listen``) is a loopback address; the node logs a warning.
    allow_insecure_transport: bool = False
    #: gRPC TLS (docs/architecture.md, "Security"): this node's certificate
    #: chain and private key, PEM files. Required unless ``insecure_grpc``.
    #: Re-read when they change on disk (no restart needed to rotate).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: CA bundle that client certificates must chain to; needed for
    #: ``grpc_mtls_listen``. Client identity: one ``raftstate://`` URI SAN.
    client_ca_file: str = ""
    #: Optional second gRPC listen address that requires a client certificate
    #: (mTLS). grpcio cannot make client certificates optional on one port,
    #: so bearer tokens use ``grpc_listen`` and certificates this one.
    grpc_mtls_listen: str = ""
    #: Bearer token keys (``<kid> <base64 key>`` per line, first one signs);
    #: empty: tokens are refused. ``raftstate cluster up`` writes token.key.
    token_key_file: str = ""
    #: Prometheus ``/metrics`` over HTTP (raftstate/metricsserver.py), e.g.
    #: ``127.0.0.1:9464``; empty: not served. HTTPS with this node's TLS
    #: certificate unless ``insecure_grpc``; with ``auth = "required"`` a
    #: scrape needs the operator (or admin) role: a bearer token, or a client
    #: certificate (verified against ``client_ca_file``, optional on this port).
    metrics_listen: str = ""
    #: "required": every RPC but health needs a credential (mTLS certificate
    #: or bearer token) whose role allows it. "off": no authentication
    #: (anyone reaching the port may do anything), loopback only.
    auth: str = "required"
    #: Serve gRPC in plaintext. Only when every gRPC address of this node is
    #: loopback; the node logs a warning. ``NodeConfig.for_tests()`` sets it.
    insecure_grpc: bool = False
    #: "process-crash": an acknowledged heartbeat is in the OS page cache of a
    #: majority (survives kill -9 of any or all processes). "fsync": it is on
    #: stable storage of a majority (survives power loss), at a latency cost.
    durability: str = "process-crash"
    #: Leader's AppendEntries/heartbeat period (pysyncobj appendEntriesPeriod).
    heartbeat_ms: int = 50
    election_timeout_min_ms: int = 600
    election_timeout_max_ms: int = 1200
    #: Check-quorum: a leader with no answer from a majority for this long
    #: steps down (pysyncobj leaderFallbackTimeout, 30 s by default there).
    leader_step_down_ms: int = 800
    #: Derive the four timers above from each link's measured RTT and loss
    #: (raftstate/linktiming.py; UDP transport only). The values above hold
    #: until a link has an RTT sample, and always on TCP or when off.
    adaptive_timing: bool = True
    #: Bounds of the derived election timeout: the minimum timeout never goes
    #: below the floor (the host's scheduling needs it; lan failover is about
    #: floor..2 x floor), the maximum never above the ceiling.
    election_timeout_floor_ms: int = 300
    election_timeout_ceiling_ms: int = 5000
    #: Upper bound on the tick thread's sleep (pysyncobj autoTickPeriod).
    tick_ms: int = 20
    #: How long a thread may hold the GIL while another waits for it
    #: (``sys.setswitchinterval``; CPython's default is 5000). The event loop
    #: (gRPC calls, the UDP transport) and the Raft tick thread share one
    #: GIL: with a busy tick thread, every hand-over to the loop cost up to
    #: the whole interval, and accepting one gRPC call takes several.
    gil_switch_interval_us: int = 1000
    #: pysyncobj connection timers.
    connection_timeout_ms: int = 1500
    connection_retry_ms: int = 250
    #: Group commit: a batch is sealed after this long, or earlier when full,
    #: or at once when no earlier batch is still waiting to commit.
    batch_max_delay_ms: float = 5.0
    batch_max_heartbeats: int = 512
    #: Largest log entry. pysyncobj is told to send entries of up to 4× this
    #: per AppendEntries, so it never splits one entry into its broken
    #: chunked 'transmission' form (docs/architecture.md, "Entry bound").
    batch_max_bytes: int = 128 * 1024
    #: Batches proposed and not yet committed, per node: at least this many;
    #: raised with the commit round trip (ceil(commit / batch_max_delay)
    #: + 1, raftstate/batcher.py SlotSizer) up to max_inflight_batches_cap,
    #: so a WAN link does not queue heartbeats for a slot. Cap = floor: fixed.
    max_inflight_batches: int = 4
    max_inflight_batches_cap: int = 32
    #: Three voters only: a follower treats an entry of the leader's term as
    #: committed once it holds it (it and the leader are a majority), so a
    #: heartbeat sent to a follower is acknowledged one round trip sooner;
    #: linearizable reads then wait for the leader's last log index
    #: (raftstate/fastcommit.py). No effect with five voters.
    follower_commit: bool = True
    #: PreVote (Raft thesis §9.6): a node whose election timer fires first asks
    #: a majority whether it could win, without changing its term, and peers
    #: that heard from a leader within election_timeout_min_ms say no; so a
    #: follower that was cut off and rejoins cannot depose a healthy leader
    #: (raftstate/prevote.py). Turn off only to compare with plain pysyncobj.
    pre_vote: bool = True
    #: Heartbeats waiting on a node before new ones get RESOURCE_EXHAUSTED.
    max_pending_heartbeats: int = 20_000
    #: Unary RPCs this node serves at once; more get RESOURCE_EXHAUSTED
    #: naming this field (raftstate/rpcguard.py).
    max_concurrent_rpcs: int = 4096
    #: Streams (HeartbeatStream, health Watch) open at once on this node.
    max_streams: int = 1000
    #: Heartbeats one stream may have read and not yet answered; the node
    #: stops reading that stream beyond it (HTTP/2 flow control then holds
    #: the client back). Sent to clients, which keep within it.
    stream_window: int = DEFAULT_STREAM_WINDOW
    #: Watch streams open at once on this node; more get RESOURCE_EXHAUSTED
    #: naming this field (a gate of its own, apart from max_streams).
    watch_max_watchers: int = 2_000
    #: Events queued for one watcher whose stream is not keeping up; beyond
    #: it the watch ends with RESOURCE_EXHAUSTED (WATCHER_TOO_SLOW) and the
    #: revision to resume from.
    #: Worst case, every watcher stalled: ~64 B x watch_max_pending x
    #: watch_max_watchers (defaults: ~320 MB).
    watch_max_pending: int = 2_500
    #: How often an idle watcher gets a progress response (its resume point)
    #: unless its request asks for another interval.
    watch_progress_ms: int = 5000
    #: Heartbeats one HeartbeatBatch request may carry; more is refused as a
    #: whole with INVALID_ARGUMENT naming ``heartbeats``. Requests are also
    #: limited to 4 MiB (raftstate/admission.py, MAX_BATCH_REQUEST_BYTES).
    batch_rpc_max_heartbeats: int = DEFAULT_BATCH_RPC_MAX_HEARTBEATS
    #: HeartbeatBatch calls this node serves at once (each may hold up to
    #: 4 MiB of request); more get RESOURCE_EXHAUSTED naming this field.
    max_concurrent_batch_rpcs: int = 32
    #: Cluster quotas (0 = no limit): devices, and bytes of device state
    #: (UTF-8 ids + reported keys and values). The proposing node stamps them
    #: into each log entry, so every node applies the same ones; keep them
    #: equal on every node.
    max_devices: int = 2_000_000
    max_state_bytes: int = 1024**3
    #: Snapshot + log truncation once the log has this many entries ...
    compaction_min_entries: int = 20_000
    #: ... or this long after the previous snapshot ...
    compaction_min_time_s: int = 600
    #: ... or once the journal file exceeds this many bytes (and at least half
    #: of that is applied entries a snapshot would free).
    compaction_max_journal_bytes: int = 64 * 1024 * 1024
    #: Consecutive Raft ticks that raise before the node gives up: a leader
    #: steps down, then the process exits with status 75 so its supervisor
    #: restarts it from its verified snapshot and journal.
    tick_failure_limit: int = 5
    default_ttl_s: int = 30
    #: A heartbeat whose seq is more than this many seconds (in µs) ahead of
    #: this node's clock is refused with INVALID_ARGUMENT naming ``seq``, so a
    #: single bogus seq (e.g. 2^64-1) cannot turn every later heartbeat of the
    #: device into a duplicate. Counter seqs (small numbers) are unaffected.
    max_seq_ahead_s: int = 86_400
    #: How early (against the previous leader's clock) a new leader may
    #: expire a device last seen before its term, whatever its own clock says
    #: (raftstate/presence.py).
    max_clock_skew_ms: int = 500
    #: The event window (Watch history, reads at a revision): at most this
    #: many events ...
    watch_history_events: int = 100_000
    #: ... and none older than this (log time).
    watch_history_s: int = 600
    #: Deadline for requests that carry none.
    default_request_timeout_ms: int = 5000
    log_level: str = "INFO"
    #: TEST-ONLY negative control: serve LINEARIZABLE reads from local state
    #: without ReadIndex. Breaks linearizability; never set it in production.
    unsafe_serve_local_reads: bool = False
    #: TEST-ONLY fault injection: while this file exists, every Raft tick raises.
    test_fail_ticks_file: str = ""

    # ---- construction ---------------------------------------------------------

    @classmethod
    def default(cls, **overrides: Any) -> NodeConfig:
        """The embedded defaults, with ``overrides`` applied (not validated)."""
        return dataclasses.replace(cls(), **overrides)

    @classmethod
    def for_tests(cls, **overrides: Any) -> NodeConfig:
        """Fast timers for tests on a loaded two-core machine, and plaintext
        gRPC without authentication (loopback only: validation refuses it
        elsewhere). ``LocalCluster(..., secure=True)`` turns security on."""
        fast: dict[str, Any] = dict(
            heartbeat_ms=40,
            election_timeout_min_ms=400,
            election_timeout_max_ms=800,
            leader_step_down_ms=600,
            election_timeout_floor_ms=400,
            connection_timeout_ms=1000,
            connection_retry_ms=100,
            allow_insecure_transport=False,
            insecure_grpc=True,
            auth="off",
        )
        fast.update(overrides)
        return dataclasses.replace(cls(), **fast)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        flags: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> NodeConfig:
        """Build a config from a TOML file, then flags, then the environment,
        and validate it. Raises ``ConfigError``."""
        values: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    values.update(tomllib.load(fh))
            except FileNotFoundError:
                raise ConfigError(f"config file {path} does not exist") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, raw in (flags or {}).items():
            values[key] = _coerce(key, raw)
        env = os.environ if environ is None else environ
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env and f.name != "members":
                values[f.name] = _coerce(f.name, env[name])
        cfg = cls.from_mapping(values)
        cfg.validate()
        return cfg

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Build (without validating) from plain values, e.g. parsed TOML."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{key}: unknown setting")
            if key == "members":
                kwargs[key] = _members(value)
            elif key in ("peer_raft", "peer_keys"):
                kwargs[key] = _peer_raft(value, key)
            else:
                kwargs[key] = _typed(key, known[key].type, value)
        return cls(**kwargs)

    def to_toml(self) -> str:
        """Render as TOML that :meth:`load` reads back to an equal config."""
        lines = []
        for f in dataclasses.fields(self):
            if f.name in ("members", "peer_raft", "peer_keys"):
                continue
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        if self.peer_raft:
            lines += ["", "[peer_raft]"]
            lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in self.peer_raft.items()]
        if self.peer_keys:
            lines += ["", "[peer_keys]"]
            lines += [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in self.peer_keys.items()]
        for m in self.members:
            lines += [
                "",
                "[[members]]",
                f'id = "{m.id}"',
                f'raft = "{m.raft}"',
                f'grpc = "{m.grpc}"',
            ]
        return "\n".join(lines) + "\n"

    # ---- derived --------------------------------------------------------------

    @property
    def self_member(self) -> Member:
        for m in self.members:
            if m.id == self.node_id:
                return m
        raise ConfigError(f"node_id: {self.node_id!r} is not one of members")

    @property
    def grpc_bind(self) -> str:
        return loopback_if_no_host(self.grpc_listen or self.self_member.grpc)

    @property
    def raft_bind(self) -> str:
        return loopback_if_no_host(self.raft_listen or self.self_member.raft)

    # ---- validation -----------------------------------------------------------

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the first field that breaks a rule."""
        if not _NODE_ID.fullmatch(self.node_id):
            raise ConfigError("node_id: must be 1-64 characters from [A-Za-z0-9._-]")
        if not self.members:
            raise ConfigError("members: at least one member is required")
        ids = [m.id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ConfigError("members: member ids must be unique")
        raft_addrs = [m.raft for m in self.members]
        if len(set(raft_addrs)) != len(raft_addrs):
            raise ConfigError("members: raft addresses must be unique")
        for m in self.members:
            if not _NODE_ID.fullmatch(m.id):
                raise ConfigError(
                    f"members.id: {m.id!r} must be 1-64 characters from [A-Za-z0-9._-]"
                )
            _check_hostport(f"members[{m.id}].raft", m.raft)
            _check_hostport(f"members[{m.id}].grpc", m.grpc)
        if self.node_id not in ids:
            raise ConfigError(f"node_id: {self.node_id!r} is not one of members {ids}")
        if self.grpc_listen:
            _check_hostport("grpc_listen", loopback_if_no_host(self.grpc_listen))
        if self.raft_listen:
            _check_hostport("raft_listen", loopback_if_no_host(self.raft_listen))
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport: must be one of {', '.join(TRANSPORTS)}")
        for peer_id, address in self.peer_raft.items():
            if peer_id == self.node_id or peer_id not in ids:
                raise ConfigError(
                    f"peer_raft: {peer_id!r} must be the id of another member ({ids})"
                )
            _check_hostport(f"peer_raft[{peer_id}]", address)
        if self.peer_raft and self.transport != "udp":
            raise ConfigError(
                'peer_raft: only applies to transport = "udp" (pysyncobj\'s TCP transport '
                "dials the members' raft addresses); remove it or set transport"
            )
        self._validate_reach()
        self._validate_grpc_security()
        if self.durability not in DURABILITY:
            raise ConfigError(f"durability: must be one of {', '.join(DURABILITY)}")
        if self.transport == "udp" and not self.cluster_secret:
            raise ConfigError(
                'cluster_secret: required for transport = "udp" (UDP is always authenticated '
                "and encrypted; allow_insecure_transport does not apply)"
            )
        if not self.cluster_secret and not self.allow_insecure_transport:
            raise ConfigError(
                "cluster_secret: required (or set allow_insecure_transport = true for a demo)"
            )
        if not self.cluster_secret:
            self._validate_insecure()
        if self.cluster_secret:
            check_secret("cluster_secret", self.cluster_secret)
        self._validate_node_keys(ids)
        if self.max_seq_ahead_s < 1:
            raise ConfigError("max_seq_ahead_s: must be at least 1")
        if not 0 <= self.max_clock_skew_ms <= 60_000:
            raise ConfigError("max_clock_skew_ms: must be between 0 and 60000")
        if not 1 <= self.watch_history_events <= 10_000_000:
            raise ConfigError("watch_history_events: must be between 1 and 10000000")
        if not 1 <= self.watch_history_s <= 7 * 24 * 3600:
            raise ConfigError("watch_history_s: must be between 1 and 604800 (7 days)")
        if not self.data_dir:
            raise ConfigError("data_dir: must not be empty")
        _positive(
            self,
            "heartbeat_ms",
            "tick_ms",
            "connection_retry_ms",
            "batch_max_heartbeats",
            "batch_max_bytes",
            "max_inflight_batches",
            "max_inflight_batches_cap",
            "max_pending_heartbeats",
            "max_concurrent_rpcs",
            "max_streams",
            "stream_window",
            "watch_max_watchers",
            "watch_max_pending",
            "batch_rpc_max_heartbeats",
            "max_concurrent_batch_rpcs",
            "compaction_min_time_s",
            "default_ttl_s",
            "default_request_timeout_ms",
        )
        if not RECORD_MAX_BYTES + BATCH_HEADER_BOUND <= self.batch_max_bytes <= BATCH_MAX_BYTES:
            raise ConfigError(
                f"batch_max_bytes: must be between {RECORD_MAX_BYTES + BATCH_HEADER_BOUND} "
                f"(one heartbeat of the largest allowed size) and {BATCH_MAX_BYTES}"
            )
        if self.batch_rpc_max_heartbeats > BATCH_RPC_MAX_HEARTBEATS_LIMIT:
            raise ConfigError(
                f"batch_rpc_max_heartbeats: must be at most {BATCH_RPC_MAX_HEARTBEATS_LIMIT}"
            )
        if self.batch_rpc_max_heartbeats > self.max_pending_heartbeats:
            raise ConfigError(
                "batch_rpc_max_heartbeats: must not exceed max_pending_heartbeats "
                "(a full batch could never be admitted)"
            )
        for name in ("max_devices", "max_state_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must not be negative (0 = no limit)")
        if self.watch_progress_ms < 100:
            raise ConfigError("watch_progress_ms: must be at least 100")
        if self.batch_max_delay_ms < 0:
            raise ConfigError("batch_max_delay_ms: must not be negative")
        if self.election_timeout_min_ms <= 3 * self.heartbeat_ms:
            raise ConfigError("election_timeout_min_ms: must exceed 3 × heartbeat_ms")
        if self.election_timeout_max_ms <= self.election_timeout_min_ms:
            raise ConfigError("election_timeout_max_ms: must exceed election_timeout_min_ms")
        if self.leader_step_down_ms <= 2 * self.heartbeat_ms:
            raise ConfigError("leader_step_down_ms: must exceed 2 × heartbeat_ms")
        if self.connection_timeout_ms < self.election_timeout_max_ms:
            raise ConfigError("connection_timeout_ms: must be at least election_timeout_max_ms")
        if self.tick_ms > self.heartbeat_ms:
            raise ConfigError("tick_ms: must not exceed heartbeat_ms")
        if not 100 <= self.gil_switch_interval_us <= 50_000:
            raise ConfigError("gil_switch_interval_us: must be between 100 and 50000")
        if self.election_timeout_floor_ms < 10 * self.tick_ms:
            raise ConfigError(
                "election_timeout_floor_ms: must be at least 10 × tick_ms "
                "(a derived heartbeat period is a tenth of it)"
            )
        if self.election_timeout_ceiling_ms < 2 * self.election_timeout_floor_ms:
            raise ConfigError(
                "election_timeout_ceiling_ms: must be at least 2 × election_timeout_floor_ms"
            )
        if self.compaction_min_entries < 2:
            raise ConfigError("compaction_min_entries: must be at least 2")
        if self.compaction_max_journal_bytes < 4 * self.batch_max_bytes:
            raise ConfigError(
                "compaction_max_journal_bytes: must be at least 4 × batch_max_bytes "
                "(else nearly every entry would trigger a snapshot)"
            )
        if self.tick_failure_limit < 1:
            raise ConfigError("tick_failure_limit: must be at least 1")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError("log_level: must be DEBUG, INFO, WARNING or ERROR")

    def _validate_insecure(self) -> None:
        """Without a secret anyone who can reach a raft port can write to the
        log, so allow it only when no raft port is reachable off this host."""
        addrs = [(f"members[{m.id}].raft", m.raft) for m in self.members]
        if self.raft_listen:
            addrs.append(("raft_listen", self.raft_listen))
        for name, address in addrs:
            if not _is_loopback(address):
                raise ConfigError(
                    f"allow_insecure_transport: only for a cluster on loopback, but {name} = "
                    f"{address!r} is not a loopback address; set cluster_secret"
                )

    def _validate_node_keys(self, ids: list[str]) -> None:
        if not (self.node_key_file or self.peer_keys):
            return
        if self.transport != "udp":
            raise ConfigError(
                'node_key_file: node keys apply to transport = "udp" only (pysyncobj\'s TCP '
                "transport authenticates with cluster_secret alone); remove them or use udp"
            )
        if not self.node_key_file:
            raise ConfigError("node_key_file: required with peer_keys (this node's private key)")
        for member_id, key in self.peer_keys.items():
            if member_id not in ids:
                raise ConfigError(f"peer_keys: {member_id!r} is not a member ({ids})")
            decode_key(f"peer_keys[{member_id}]", key)
        missing = [m for m in ids if m != self.node_id and m not in self.peer_keys]
        if missing:
            raise ConfigError(f"peer_keys: no public key for members {missing}")

    def _validate_grpc_security(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ConfigError(f"auth: must be one of {', '.join(AUTH_MODES)}")
        if self.grpc_mtls_listen:
            _check_hostport("grpc_mtls_listen", self.grpc_mtls_listen)
        grpc_addrs = [("grpc_listen" if self.grpc_listen else "members.grpc", self.grpc_bind)]
        if self.grpc_mtls_listen:
            grpc_addrs.append(("grpc_mtls_listen", self.grpc_mtls_listen))
        if self.metrics_listen:
            _check_hostport("metrics_listen", loopback_if_no_host(self.metrics_listen))
            grpc_addrs.append(("metrics_listen", loopback_if_no_host(self.metrics_listen)))
        if self.insecure_grpc or self.auth == "off":
            what = "insecure_grpc" if self.insecure_grpc else 'auth = "off"'
            for name, address in grpc_addrs:
                if not _is_loopback(address):
                    raise ConfigError(
                        f"{'insecure_grpc' if self.insecure_grpc else 'auth'}: {what} is only "
                        f"for loopback, but {name} = {address!r} is not a loopback address; "
                        "set tls_cert_file/tls_key_file and auth = \"required\""
                    )
        if self.insecure_grpc:
            if self.grpc_mtls_listen:
                raise ConfigError("grpc_mtls_listen: needs TLS; unset insecure_grpc")
        elif not (self.tls_cert_file and self.tls_key_file):
            raise ConfigError(
                "tls_cert_file: gRPC is TLS by default and needs tls_cert_file and tls_key_file "
                "(`raftstate cluster up` makes them; or insecure_grpc = true on loopback)"
            )
        if self.grpc_mtls_listen and not self.client_ca_file:
            raise ConfigError("client_ca_file: required with grpc_mtls_listen")
        if self.auth == "required" and not (self.token_key_file or self.grpc_mtls_listen):
            raise ConfigError(
                'auth: "required" needs a credential kind: token_key_file (bearer tokens) '
                "and/or grpc_mtls_listen with client_ca_file (client certificates)"
            )

    def _validate_reach(self) -> None:
        if self.reach not in REACH:
            raise ConfigError(f"reach: must be one of {', '.join(REACH)}")
        if self.reach != "ice":
            return
        if self.transport != "udp":
            raise ConfigError('reach: "ice" needs transport = "udp"')
        if self.peer_raft:
            raise ConfigError('peer_raft: does not apply to reach = "ice"; remove it')
        if not self.rendezvous:
            raise ConfigError('rendezvous: required for reach = "ice" (host:port)')
        _check_hostport("rendezvous", self.rendezvous)
        if not self.stun_server:
            raise ConfigError('stun_server: required for reach = "ice" (host:port)')
        _check_hostport("stun_server", self.stun_server)
        if self.turn_server:
            _check_hostport("turn_server", self.turn_server)
            if not (self.turn_username and self.turn_password):
                raise ConfigError(
                    "turn_username: turn_server needs turn_username and turn_password"
                )
        if not self.rendezvous_secret:
            raise ConfigError(
                'rendezvous_secret: required for reach = "ice" (the credential for the '
                "rendezvous, distinct from cluster_secret); generate one with `raftstate secret`"
            )
        if self.rendezvous_secret == self.cluster_secret:
            raise ConfigError(
                "rendezvous_secret: must differ from cluster_secret (the rendezvous host "
                "must not be able to decrypt Raft traffic)"
            )
        check_secret("rendezvous_secret", self.rendezvous_secret)
        if self.ice_connect_timeout_ms < 500:
            raise ConfigError("ice_connect_timeout_ms: must be at least 500")


def _positive(cfg: NodeConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}: must be positive")


def _is_loopback(hostport: str) -> bool:
    host = hostport.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def loopback_if_no_host(address: str) -> str:
    """``":port"`` -> ``"127.0.0.1:port"``: a listen address without a host
    binds loopback; give ``0.0.0.0`` (or ``[::]``) to listen everywhere."""
    return "127.0.0.1" + address if address.startswith(":") else address


def _check_hostport(name: str, value: str) -> None:
    m = _HOSTPORT.fullmatch(value)
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"{name}: {value!r} is not host:port")


def _members(value: Any) -> tuple[Member, ...]:
    if isinstance(value, str):  # "id=raft=grpc,id=raft=grpc" from a flag
        out = []
        for part in filter(None, value.split(",")):
            pieces = part.split("=")
            if len(pieces) != 3:
                raise ConfigError("members: expected id=raft_host:port=grpc_host:port,...")
            out.append(Member(*pieces))
        return tuple(out)
    if not isinstance(value, list):
        raise ConfigError("members: must be an array of tables with id, raft, grpc")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"id", "raft", "grpc"}:
            raise ConfigError("members: each member needs exactly id, raft and grpc")
        out.append(Member(str(item["id"]), str(item["raft"]), str(item["grpc"])))
    return tuple(out)


def _peer_raft(value: Any, name: str = "peer_raft") -> dict[str, str]:
    """A ``member id -> string`` table (``peer_raft``, ``peer_keys``)."""
    what = "host:port" if name == "peer_raft" else "key"
    if isinstance(value, str):  # "id=value,id=value" from a flag or the environment
        out: dict[str, str] = {}
        for part in filter(None, value.split(",")):
            peer_id, sep, address = part.partition("=")
            if not sep:
                raise ConfigError(f"{name}: expected id={what},...")
            out[peer_id.strip()] = address.strip()
        return out
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(f'{name}: must be a table of member id = "{what}"')
    return dict(value)


def _typed(key: str, annotation: Any, value: Any) -> Any:
    kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(annotation), str)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: must be an integer")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: must be a {kind.__name__}")
    return value


def _coerce(key: str, raw: str) -> Any:
    """Turn a flag or environment string into the field's type."""
    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    if key not in fields:
        raise ConfigError(f"{key}: unknown setting")
    if key in ("members", "peer_raft", "peer_keys"):
        return raw
    kind = str(fields[key].type)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}: {raw!r} is not a number") from None
    if kind == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: {raw!r} is not true or false")
    return raw


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


__all__ = ["AUTH_MODES", "Member", "NodeConfig"]
