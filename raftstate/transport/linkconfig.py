"""Configuration and statistics of the reliable link
(:mod:`raftstate.transport.reliable`)."""

from __future__ import annotations

from dataclasses import dataclass

from raftstate.errors import ConfigError
from raftstate.transport.frames import MAX_CHUNK_LENGTH
from raftstate.transport.recovery import RecoveryParams


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Tuning of one reliable link. Both ends should use the same values
    (``max_ack_delay`` and ``receive_window`` are assumed of the peer).
    Times are seconds. Defaults target WAN paths of 20-300 ms RTT with up to
    ~10 % loss and Raft traffic (many small messages, occasional MBs)."""

    #: Hard flood guard above the congestion window: ~110 full datagrams,
    #: i.e. ~2 MB/s at 60 ms RTT (a 2 MB snapshot in ~1 s).
    max_inflight_bytes: int = 128 * 1024
    #: Caps datagrams per RTT for small frames: 256 carries a 1 message/ms
    #: flow over a 200 ms RTT without queueing behind the cap.
    max_inflight_frames: int = 256
    #: Bytes queued or unacked before ``send`` says False.
    send_buffer_bytes: int = 8 * 1024 * 1024
    #: Largest single message (pysyncobj sends snapshots in pieces, and
    #: AppendEntries batches stay far below this).
    max_message_bytes: int = 4 * 1024 * 1024
    #: Out-of-order bytes the receiver buffers. Above the in-flight cap, so
    #: it only limits how far the sender runs ahead of a hole under repair.
    receive_window: int = 1024 * 1024
    #: ACK timer (also the assumed peer value). A Raft reply is produced on
    #: the tick thread, a thread hop after its request arrived (~1-5 ms), and
    #: the leader's next AppendEntries follows a reply within a few ms at
    #: 150 heartbeats/s: 8 ms lets both carry the ACK instead of a bare ACK
    #: datagram (linksim: bare ACKs per heartbeat 2.39 -> 0.39 on lan, 1.62
    #: -> 1.08 on weak). Gaps are still acked at once, so loss detection is
    #: as timely; only the PTO grows by the extra 6 ms. Below ``pto_min``.
    max_ack_delay: float = 0.008
    #: Ack at once after this many ack-eliciting frames (RFC 9002 §13.2.2).
    ack_eliciting_threshold: int = 2
    max_ack_ranges: int = 32
    #: RTT assumed before the first sample. Seed it from the handshake or
    #: the ICE consent RTT when known (RFC 9002 uses 333 ms).
    initial_rtt: float = 0.1
    #: RFC 9002 kTimeThreshold: reordering up to RTT/8 (7.5 ms at 60 ms) is
    #: not taken for loss; a real loss is resent ~1.125 RTT after the send.
    time_threshold: float = 9 / 8
    #: RFC 9002 kPacketThreshold / TCP dupthresh (0 disables it).
    packet_threshold: int = 3
    #: RFC 9002 kGranularity: timer resolution assumed of the driver.
    granularity: float = 0.001
    #: PTO bounds. 10 ms keeps LAN links (RTT ~0.2 ms) from probing on every
    #: scheduler hiccup; 0.5 s bounds the repair of a healed partition to
    #: half a second while a cut-off link costs two tiny probes a second.
    pto_min: float = 0.010
    pto_max: float = 0.5
    #: Copies of each recent chunk carried in later frames' spare room
    #: (RFC 2198-style redundancy): at least ``redundancy``, raised up to
    #: ``redundancy_max`` while the measured loss rate p gives
    #: p ** (copies + 1) > ``redundancy_target``. 0/0 disables it. The floor
    #: is 0: on a clean path (p below the target) copies and tail copies
    #: only cost CPU and datagrams (measured: 4 datagrams per AppendEntries
    #: round trip instead of 2 on loopback); the link starts at
    #: ``initial_loss_rate`` and so with copies until it has measured.
    redundancy: int = 0
    redundancy_max: int = 3
    redundancy_target: float = 1e-4
    #: A copy of the unacked tail of a burst goes out this fraction of srtt
    #: after its last new frame (15 ms at 60 ms RTT), never sooner than
    #: ``tail_copy_min``: late enough to escape a short loss burst, far
    #: earlier than the PTO (~1.5-2 RTT).
    tail_copy_fraction: float = 0.25
    tail_copy_min: float = 0.002
    #: No ACK progress this long with data waiting: the link is dead. Room
    #: for several pto_max probes, so short partitions heal in place; far
    #: below aioice's 30 s consent timeout.
    dead_after: float = 5.0
    #: Weight of each frame's fate (lost 1 / acked 0) in the loss estimate:
    #: a memory of ~256 frames keeps the estimate of a 3 % path within
    #: about ±0.8 %, so the redundancy level does not flap with every loss.
    loss_ewma_weight: float = 1 / 256
    #: Loss estimate before any frame's fate is known: assume a lossy path
    #: (two copies) until it shows otherwise; a clean one decays to one copy
    #: within ~200 frames.
    initial_loss_rate: float = 0.02
    #: Bulk data (more ready than one frame holds) goes under a NewReno
    #: window with pacing (raftstate/transport/congestion.py); small frames
    #: never wait for it. False: only the in-flight caps (A/B, tests).
    congestion_control: bool = True
    #: What counts as bulk: more than this many bytes ready (new data plus
    #: retransmissions) when a frame is built. Raft's own traffic under loss
    #: (a few AppendEntries queued behind a lost frame, their repairs) stays
    #: below it and is never paced; a catch-up or snapshot stream is far
    #: above it. With the bar at one frame, the lab's ``bad`` profile
    #: classed ordinary repairs as bulk and its heartbeat p99 went from
    #: 315 ms to 3.1 s.
    bulk_threshold_bytes: int = 16384

    @classmethod
    def default(cls) -> LinkConfig:
        """The documented defaults."""
        return cls()

    @classmethod
    def for_tests(cls) -> LinkConfig:
        """Defaults with a quicker death verdict, for partition tests."""
        return cls(dead_after=2.0)

    def recovery_params(self) -> RecoveryParams:
        """The fields loss recovery uses."""
        return RecoveryParams(
            initial_rtt=self.initial_rtt, max_ack_delay=self.max_ack_delay,
            time_threshold=self.time_threshold, packet_threshold=self.packet_threshold,
            granularity=self.granularity, pto_min=self.pto_min, pto_max=self.pto_max,
            loss_ewma_weight=self.loss_ewma_weight, initial_loss_rate=self.initial_loss_rate,
        )  # fmt: skip

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that breaks a rule."""
        positive = (
            "max_inflight_bytes", "max_inflight_frames", "send_buffer_bytes",
            "max_message_bytes", "ack_eliciting_threshold", "initial_rtt",
            "granularity", "pto_min", "dead_after",
        )  # fmt: skip
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.max_message_bytes + 8 > self.send_buffer_bytes:
            raise ConfigError("send_buffer_bytes: must be at least max_message_bytes + 8")
        if self.receive_window < 4 * MAX_CHUNK_LENGTH:
            raise ConfigError(f"receive_window: must be at least {4 * MAX_CHUNK_LENGTH}")
        if not 0 <= self.max_ack_delay < self.pto_min:
            raise ConfigError("max_ack_delay: must be >= 0 and below pto_min")
        if not 0 <= self.max_ack_ranges <= 63:
            raise ConfigError("max_ack_ranges: must be in [0, 63]")
        if self.time_threshold < 1:
            raise ConfigError("time_threshold: must be at least 1")
        if self.packet_threshold < 0:
            raise ConfigError("packet_threshold: must be >= 0 (0 disables it)")
        if self.pto_max < self.pto_min:
            raise ConfigError("pto_max: must be at least pto_min")
        if self.dead_after <= 2 * self.pto_max:
            raise ConfigError("dead_after: must exceed 2 x pto_max (room for probes)")
        if not 0 <= self.redundancy <= self.redundancy_max <= 8:
            raise ConfigError("redundancy: need 0 <= redundancy <= redundancy_max <= 8")
        if not 0 < self.redundancy_target < 1:
            raise ConfigError("redundancy_target: must be in (0, 1)")
        if self.tail_copy_fraction < 0 or self.tail_copy_min < 0:
            raise ConfigError("tail_copy_fraction: must be >= 0 (and tail_copy_min too)")
        if not 0 < self.loss_ewma_weight <= 1:
            raise ConfigError("loss_ewma_weight: must be in (0, 1]")
        if not 0 <= self.initial_loss_rate < 1:
            raise ConfigError("initial_loss_rate: must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Counters and estimates of one link since it was made. Times in
    seconds; RTT fields are ``None`` before the first sample."""

    srtt: float | None
    rttvar: float | None
    min_rtt: float | None
    pto: float
    #: EWMA of frame fates; spurious losses (reordering) count too. It starts
    #: at ``initial_loss_rate`` (a prior, for redundancy); see loss_measured.
    loss_rate: float
    redundancy: int  # copies currently added per chunk
    bytes_in_flight: int
    frames_in_flight: int
    buffered_bytes: int  # queued or unacked
    frames_sent: int
    ack_frames_sent: int  # frames carrying nothing but an ACK
    frames_received: int
    frames_lost: int
    spurious_losses: int  # declared lost, then acked after all (reordering)
    retransmissions: int  # chunks resent after loss or by a probe
    redundant_chunks: int  # chunk copies sent proactively
    probes: int
    duplicates: int  # frames received twice
    duplicate_bytes: int  # stream bytes received again
    malformed: int
    window_drops: int
    messages_sent: int
    messages_delivered: int
    send_rejected: int
    redundant_bytes: int = 0  # bytes of the proactive copies (their records)
    #: Congestion window (bytes; ``None`` without congestion control), window
    #: cuts, bulk losses taken as random (window kept), pacer waits.
    cwnd: int | None = None
    cc_reductions: int = 0
    cc_random_losses: int = 0
    cc_pacing_waits: int = 0
    #: The loss rate measured on this link (the prior taken out), or ``None``
    #: before enough frames' fates are known (an idle link): what to show.
    loss_measured: float | None = None
    #: P(frame lost | previous frame lost), the burst estimate (recovery.py).
    burst_loss: float | None = None
    #: Loss of the frames this end *receives* (the peer's direction), from
    #: the missing frame numbers (raftstate/transport/rxloss.py): what a
    #: follower's election timer depends on. ``None`` until measured.
    rx_loss: float | None = None
    #: P(received frame lost | previous lost) in that direction.
    rx_burst: float | None = None
