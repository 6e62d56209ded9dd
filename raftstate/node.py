"""One raftstate node process: Raft (tick thread) + gRPC (uvloop loop).

``run_node(cfg)`` builds the device table, starts pysyncobj, serves gRPC
until SIGTERM/SIGINT, then shuts down in order: stop taking requests, fail
what is still pending with UNAVAILABLE, stop Raft.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import signal
import sys
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from raftstate import stallprobe
from raftstate.admission import MAX_BATCH_REQUEST_BYTES, MAX_RESPONSE_BYTES
from raftstate.authn import Authenticator, CertReloader, load_token_keys, server_credentials
from raftstate.authservice import AuthService
from raftstate.config import NodeConfig, loopback_if_no_host
from raftstate.errors import ConfigError, Unavailable
from raftstate.eventwindow import EventWindow
from raftstate.grpcmetrics import GrpcMetrics, GrpcMetricsInterceptor
from raftstate.health import HealthService, track_health
from raftstate.metrics import NodeCollector, OnlineCounter
from raftstate.metricsserver import MetricsServer, TlsContexts
from raftstate.proposer import Proposer
from raftstate.raftnode import RaftNode
from raftstate.reads import ReadIndexDriver
from raftstate.rpcguard import RpcGuard
from raftstate.server import ClusterService, DeviceStateService, NodeServices
from raftstate.statemachine import DeviceTable
from raftstate.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    cluster_pb2,
    cluster_pb2_grpc,
    device_pb2,
    device_pb2_grpc,
)
from raftstate.watchhub import WatchHub
from raftstate.watchwire import encode_event

log = logging.getLogger("raftstate.node")

GRPC_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    # Deliberate message limits (raftstate/admission.py): a request larger than
    # any legal batch is refused by gRPC before it is buffered (the admission
    # layer holds every other method to MAX_REQUEST_BYTES); responses (List
    # pages are cut by bytes to fit) stay within what the SDK accepts.
    ("grpc.max_receive_message_length", MAX_BATCH_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_RESPONSE_BYTES),
]

#: Every service a node serves, by full name (health statuses, reflection).
SERVICE_NAMES = (
    device_pb2.DESCRIPTOR.services_by_name["DeviceStateService"].full_name,
    cluster_pb2.DESCRIPTOR.services_by_name["ClusterService"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def grpc_server(
    services: NodeServices, grpc_metrics: GrpcMetrics | None = None
) -> tuple[grpc.aio.Server, RpcGuard, HealthService]:
    """The node's gRPC server (not yet bound or started) with every service
    of :data:`SERVICE_NAMES` registered behind an :class:`RpcGuard` built
    from ``services.cfg`` (authenticating callers unless ``auth = "off"``),
    and the standard server metrics recorded into ``grpc_metrics`` when
    given. Raises ``ConfigError`` for an unreadable token key file."""
    cfg = services.cfg
    token_keys = load_token_keys(cfg.token_key_file)
    table = services.table
    authenticator = (
        Authenticator(token_keys, lambda: table.revoked) if cfg.auth == "required" else None
    )
    guard = RpcGuard(
        max_concurrent_rpcs=cfg.max_concurrent_rpcs,
        max_streams=cfg.max_streams,
        authenticator=authenticator,
        max_concurrent_batch_rpcs=cfg.max_concurrent_batch_rpcs,
        max_watchers=cfg.watch_max_watchers,
    )
    services.on_denied = guard.log_denied
    # Our gates (with named errors) trip first; gRPC's own cap is a backstop
    # for calls that pile up before a handler runs.
    backstop = 2 * (cfg.max_concurrent_rpcs + cfg.max_streams + cfg.max_concurrent_batch_rpcs)
    interceptors = [GrpcMetricsInterceptor(grpc_metrics)] if grpc_metrics is not None else []
    server = grpc.aio.server(
        options=GRPC_OPTIONS, maximum_concurrent_rpcs=backstop, interceptors=interceptors
    )
    add = guard.add_guarded
    add_device = device_pb2_grpc.add_DeviceStateServiceServicer_to_server
    add(server, add_device, DeviceStateService(services))
    add(server, cluster_pb2_grpc.add_ClusterServiceServicer_to_server, ClusterService(services))
    add(server, auth_pb2_grpc.add_AuthServiceServicer_to_server, AuthService(services, token_keys))
    health = HealthService()
    add(server, health_pb2_grpc.add_HealthServicer_to_server, health)
    # Reflection (grpcurl, Postman): any authenticated caller (raftstate/authz.py).
    add(
        server,
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
        reflection.aio.ReflectionServicer(SERVICE_NAMES),
    )
    return server, guard, health


class Node:
    """A running node. Create with :meth:`start` inside the event loop."""

    def __init__(self, cfg: NodeConfig) -> None:
        self.cfg = cfg
        self.table = DeviceTable(
            cfg.default_ttl_s, EventWindow(cfg.watch_history_events, cfg.watch_history_s)
        )
        self.raft: RaftNode | None = None
        self.proposer: Proposer | None = None
        self.reads: ReadIndexDriver | None = None
        self.server: grpc.aio.Server | None = None
        self.guard: RpcGuard | None = None
        #: The TLS certificate reloaders of the listening ports (for tests/metrics).
        self.cert_reloaders: list[CertReloader] = []
        self._health_task: asyncio.Task[None] | None = None
        self._timing_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._health: HealthService | None = None
        #: ``/metrics`` (None unless ``metrics_listen`` is set).
        self.metrics: MetricsServer | None = None
        self.grpc_metrics = GrpcMetrics()
        #: Fan-out of committed events to Watch streams (raftstate/watchhub.py).
        self.hub: WatchHub | None = None
        #: Set (with the exit status) when Raft cannot go on; see RaftNode.set_fatal_handler.
        self.fatal: asyncio.Future[int] | None = None

    async def start(self) -> None:
        """Start Raft and the gRPC server. Raises ``ConfigError`` when a port
        cannot be bound."""
        loop = asyncio.get_running_loop()
        # RaftNode's constructor waits for its transport to bind; keep the loop free.
        # The UDP transport's socket lives on this loop; Node.stop destroys Raft
        # (and so closes that socket) while the loop still runs.
        self.raft = await loop.run_in_executor(None, RaftNode, self.cfg, self.table, loop)
        self.fatal = loop.create_future()
        fatal = self.fatal

        def on_fatal(status: int) -> None:  # tick thread
            loop.call_soon_threadsafe(_resolve, fatal, status)

        self.raft.set_fatal_handler(on_fatal)
        self.proposer = Proposer(self.cfg, self.raft.propose, loop, clock_ms=self.raft.stamp_ms)
        self.reads = ReadIndexDriver(self.raft, loop, resend_after=self.cfg.heartbeat_ms / 1000)
        services = NodeServices(self.cfg, self.table, self.raft, self.proposer, self.reads)
        services.hub = self.hub = self._watch_hub(loop)
        try:
            self.server, self.guard, health = grpc_server(services, self.grpc_metrics)
            self._bind(self.server)
            if self.cfg.metrics_listen:
                self.metrics = self._metrics_server(services, self.guard)
                await self.metrics.start()
        except ConfigError:
            self.raft.destroy()
            raise
        await self.server.start()
        self._health = health
        self._health_task = asyncio.create_task(track_health(self.raft, health, SERVICE_NAMES))
        if self.cfg.adaptive_timing and self.cfg.transport == "udp":
            self._timing_task = asyncio.create_task(follow_link_timing(self.raft))
        self._probe_task = asyncio.create_task(stallprobe.run(self.proposer, self.raft))
        log.info(
            "node %s serving gRPC on %s, raft on %s, data in %s, durability %s",
            self.cfg.node_id,
            self.cfg.grpc_bind,
            self.cfg.raft_bind,
            self.cfg.data_dir,
            self.cfg.durability,
        )

    def _watch_hub(self, loop: asyncio.AbstractEventLoop) -> WatchHub:
        """The hub following the table's event window, woken on ``loop``
        by the window's listener (tick thread)."""
        window = self.table.window
        hub = WatchHub(window, encode_event, max_pending=self.cfg.watch_max_pending)
        hub.attach(loop)
        window.set_listener(hub.notify)
        return hub

    def _metrics_server(self, services: NodeServices, guard: RpcGuard) -> MetricsServer:
        """``/metrics`` on ``metrics_listen`` (raftstate/metricsserver.py):
        HTTPS with the node's certificate unless ``insecure_grpc``; the
        operator role required unless ``auth = "off"``."""
        cfg = self.cfg
        registry = CollectorRegistry(auto_describe=False)
        online = OnlineCounter(self.table)
        registry.register(NodeCollector(services, guard, self.grpc_metrics, online, _version()))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        async def render() -> bytes:
            await online.refresh()
            return generate_latest(registry)

        tls = None
        if not cfg.insecure_grpc:
            tls = TlsContexts(cfg.tls_cert_file, cfg.tls_key_file, cfg.client_ca_file)
        authenticator = guard.authenticator
        identify = authenticator.identify if authenticator is not None else None
        return MetricsServer(loopback_if_no_host(cfg.metrics_listen), render, identify, tls)

    def _bind(self, server: grpc.aio.Server) -> None:
        """Add the listening ports: TLS (or plaintext when ``insecure_grpc``)
        on ``grpc_listen``, plus the mTLS port when configured."""
        cfg = self.cfg
        ports = [("grpc_listen", cfg.grpc_bind, False)]
        if cfg.grpc_mtls_listen:
            ports.append(("grpc_mtls_listen", cfg.grpc_mtls_listen, True))
        for name, address, mtls in ports:
            try:
                if cfg.insecure_grpc:
                    port = server.add_insecure_port(address)
                else:
                    creds, reloader = server_credentials(cfg, mtls=mtls)
                    self.cert_reloaders.append(reloader)
                    port = server.add_secure_port(address, creds)
            except RuntimeError:
                port = 0
            if port == 0:
                raise ConfigError(f"{name}: cannot bind {address} (in use?)")
        if cfg.insecure_grpc:
            log.warning(
                "INSECURE: gRPC on %s is plaintext (insecure_grpc); loopback only", cfg.grpc_bind
            )
        if cfg.auth == "off":
            log.warning(
                'INSECURE: auth = "off": any process reaching %s may read, write and delete '
                "every device",
                cfg.grpc_bind,
            )

    async def stop(self, grace_s: float = 2.0) -> None:
        """Stop serving and release every resource. Idempotent."""
        if self._health_task is not None:
            self._health_task.cancel()
        if self._timing_task is not None:
            self._timing_task.cancel()
        if self._probe_task is not None:
            self._probe_task.cancel()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self.metrics is not None:
            await self.metrics.close()
        if self.hub is not None:
            # Watch streams never end by themselves: end them now (the SDK
            # resumes elsewhere) rather than after the server's grace period.
            self.hub.close(Unavailable("this node is shutting down", "SHUTTING_DOWN"))
        if self.server is not None:
            await self.server.stop(grace_s)
        if self.proposer is not None:
            self.proposer.close()
        if self.reads is not None:
            self.reads.close()
        if self.hub is not None:
            self.table.window.set_listener(None)
        if self.raft is not None:
            raft, self.raft = self.raft, None
            await asyncio.get_running_loop().run_in_executor(None, raft.destroy_synchronous)


def _version() -> str:
    try:
        return importlib.metadata.version("raftstate")
    except importlib.metadata.PackageNotFoundError:
        return ""


#: How often the Raft timers are derived again from the links' estimates.
TIMING_PERIOD_S = 0.5


async def follow_link_timing(raft: RaftNode, period_s: float = TIMING_PERIOD_S) -> None:
    """Every ``period_s``, derive the Raft timers from the measured links
    (:meth:`RaftNode.refresh_link_timing`, on this loop, which owns the UDP
    transport). Runs until cancelled; an error is logged and retried."""
    while True:
        await asyncio.sleep(period_s)
        try:
            raft.refresh_link_timing()
        except Exception:  # noqa: BLE001 - a bad estimate must not end the task
            log.exception("deriving the raft timers from the links failed")


def _resolve(fut: asyncio.Future[int], status: int) -> None:
    if not fut.done():
        fut.set_result(status)


async def _serve(cfg: NodeConfig) -> int:
    """Serve until signalled (returns 0) or until Raft gives up (returns its
    exit status, e.g. ``EXIT_TICK_FAILURES``)."""
    node = Node(cfg)
    await node.start()
    quiet_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready node={cfg.node_id} grpc={cfg.grpc_bind} raft={cfg.raft_bind}", flush=True)
    fatal: asyncio.Future[Any] = node.fatal or loop.create_future()
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopped, fatal], return_when=asyncio.FIRST_COMPLETED)
    status = int(fatal.result()) if fatal.done() else 0
    stopped.cancel()
    log.info("node %s stopping (exit status %d)", cfg.node_id, status)
    await node.stop()
    return status


#: gen0 threshold once serving (CPython's default is 700): see quiet_gc.
GC_GEN0_THRESHOLD = 50_000


def quiet_gc() -> None:
    """Keep the cyclic garbage collector from stalling Raft. A collection
    holds the GIL, so it stops the tick thread too, and a full one walks
    every tracked object: on a loaded node gen-2 collections took 70-100 ms
    and showed up as the longest ticks. Objects alive once the node serves
    (modules, the restored table, gRPC and pysyncobj state) are moved out of
    the collector's sight (``gc.freeze``), and young collections run every
    50,000 allocations instead of 700, so each collection walks only what
    the node allocated since."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def configure_logging(level: str, node_id: str = "") -> None:
    fmt = (
        "%(asctime)s %(levelname)s "
        + (f"node={node_id} " if node_id else "")
        + "%(name)s: %(message)s"
    )
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    # pysyncobj logs every reconnect attempt at WARNING; keep it for DEBUG runs.
    # aioice logs every connectivity check at INFO; ours say which path won.
    if level.upper() != "DEBUG":
        logging.getLogger("pysyncobj").setLevel(logging.ERROR)
        logging.getLogger("aioice").setLevel(logging.WARNING)


def run_node(cfg: NodeConfig) -> int:
    """Run one node until signalled. Returns the process exit code."""
    configure_logging(cfg.log_level, cfg.node_id)
    sys.setswitchinterval(cfg.gil_switch_interval_us / 1e6)
    try:
        return uvloop.run(_serve(cfg))
    except ConfigError as err:
        print(f"raftstate node: {err.message}", file=sys.stderr)
        return 2
