"""Congestion control and pacing for the reliable link's bulk data (sans-IO).

Theory of operation
-------------------
RFC 8085 §3.1 asks a UDP application that sends bulk data to control its
rate. Raft's traffic is two kinds: a steady trickle of small messages
(heartbeat-sized AppendEntries, acks, votes, ReadIndex probes) whose latency
is the product, and rare bulk (a lagging follower's catch-up: AppendEntries
batches of up to 2 MB, or a snapshot in pieces) whose throughput matters and
which must not flood a thin link. The reliable link therefore classifies
every data frame it is about to send (:mod:`~raftstate.transport.reliable`):

* **small** (the link has at most one frame's worth of data ready): sent at
  once, bounded only by the link's hard in-flight caps (its own small budget).
  Never held by the window or the pacer: device heartbeats keep committing
  during a catch-up, and a window shrunk by loss cannot throttle them.
* **bulk** (more is ready than fits one frame): sent only while
  ``bytes_in_flight < cwnd`` (all frames count, so small ones go first and
  bulk fills what is left) and when the pacer has credit.

The controller, :class:`NewReno`, is RFC 9002 §7 (NewReno in bytes: slow
start, congestion avoidance, one reduction per recovery period, persistent
congestion) with three changes for lossy radio paths, all driven by one
queueing signal, ``queue_delay`` = (minimum RTT over the last one or two
round trips) - (minimum RTT of the last ``min_rtt_window``, rule 3). Jitter
barely raises a round's
*minimum*; a standing queue at a bottleneck raises every sample, the minimum
included (the signal of TCP Vegas and of BBR's min-RTT filter).

1. **Loss is congestion only with a queue** (after TCP Veno): a loss of a
   bulk frame reduces ``cwnd`` only if ``queue_delay >= queue_target``
   (``min_rtt / 2`` within [15, 40] ms), or if the recent bulk loss rate
   (an EWMA over ~16 fates) exceeds ``heavy_loss`` (a bottleneck whose
   buffer is too shallow to show a queue). A random loss on the
   ``weak`` profile (3 %, bursts of ~1.3) arrives while the queue is short
   and costs a retransmission, not half the window; halving on every one
   would hold NewReno to ~1.2 Mbit/s at 60 ms (Mathis: 1.22 MSS / (RTT
   sqrt(p))), whatever the link's rate. Losses of small frames (their
   redundant copies, heartbeats) never touch the window: the loss recovery
   already repairs them, and they are not what fills a queue.
2. **A standing queue is congestion too**: congestion avoidance does not
   grow ``cwnd`` while ``queue_delay >= 2 * queue_target``; a round that
   ends with it still there (the minimum of two rounds) is a congestion
   event, handled like an ECN-CE mark in RFC 9002 (one cut per recovery
   period); slow start ends (ssthresh := cwnd) once ``queue_delay >=
   queue_target`` (a delay exit, as HyStart, RFC 9406). So the bulk sender
   settles near the link rate with a queue of about ``queue_target`` instead
   of filling a deep bottleneck buffer (1 s on the lab's WAN emulator) until
   it drops; a router queue shared with heartbeats stays short.
3. **The base RTT is recent**: ``min_rtt`` is the least sample of the last
   ``min_rtt_window`` seconds (kept as per-bucket minima, as BBR's min-RTT
   filter and LEDBAT's base-delay history do), and a path change (roaming,
   an ICE rebuild: :meth:`NewReno.on_path_change`) forgets it. A minimum kept
   forever turns a path whose propagation delay rose (a WAN impairment
   applied, a route or radio change) into a "standing queue" of that rise:
   rule 2 then cut the window every round and held it at the minimum
   (measured in the WAN lab: ``min_rtt`` 10 ms from before the ``weak``
   profile, 50 ms RTT after it, 158 cuts in 40 s, 25-35 KB queued per
   follower, 8 KiB heartbeats crawling). The cost: a queue that stands
   longer than the window (a deep buffer our own cuts do not drain, or a
   sibling link's or another flow's traffic) becomes the base, and losses
   behind it then read as random. A review measured that on simnet (two
   links sharing an uplink: base 54-156 ms for a 50 ms path). A ProbeRTT
   step (hold the minimum window briefly before the base may rise) would
   close it; the controller is off by default meanwhile.
   Cuts made against a base that has since risen by ``queue_target`` or
   more were not congestion: the window re-enters slow start (as after a
   path change) instead of climbing back one datagram per round trip.
4. **Persistent congestion** (RFC 9002 §7.6.2) is kept as is: bulk frames
   lost over more than ``3 * (srtt + max(4 rttvar, granularity) +
   max_ack_delay)`` with no acknowledgement between them (an outage, not
   random loss) collapse ``cwnd`` to the minimum window.

Pacing (RFC 9002 §7.7): a token bucket filled at ``gain * cwnd / srtt``
bytes/s (gain 2 in slow start, 1.25 after) holding at most
``pacing_burst_frames`` datagrams (or 2 ms of the rate on a fast path, so
loopback never waits for a timer). A bulk frame needs a non-negative
balance; :meth:`NewReno.pacing_delay` says how long until it has one, so
the link arms a timer instead of bursting a window into a thin link.

Nothing here reads a clock or does I/O: ``now`` (seconds) is passed in. Not
thread-safe.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from raftstate.errors import ConfigError

#: A round (for the queue-delay minimum) lasts at least one srtt and this
#: many RTT samples (HyStart's rule: fewer say more about jitter than about
#: a queue), or ``ROUND_MAX_RTTS`` srtt at most.
ROUND_MIN_SAMPLES = 8
ROUND_MAX_RTTS = 4
#: Weight of one bulk frame's fate (1 lost, 0 acked) in the heavy-loss EWMA.
HEAVY_EWMA_WEIGHT = 1 / 16
#: The min-RTT window is kept as this many buckets' minima.
MIN_RTT_BUCKETS = 8


class WindowedMin:
    """The least value seen in the last ``window`` seconds, within one
    bucket's width (``window / MIN_RTT_BUCKETS``): each bucket keeps its
    minimum, and a bucket that started more than ``window`` ago is dropped.
    O(1) per sample, except when a bucket is dropped."""

    __slots__ = ("_buckets", "_width", "_window", "value")

    def __init__(self, window: float) -> None:
        self._window = window
        self._width = window / MIN_RTT_BUCKETS
        self._buckets: deque[list[float]] = deque()  # [start, minimum]
        self.value = float("inf")

    def add(self, sample: float, now: float) -> None:
        """A sample at ``now`` (seconds, non-decreasing)."""
        buckets = self._buckets
        if not buckets or now >= buckets[-1][0] + self._width:
            buckets.append([now, sample])
        elif sample < buckets[-1][1]:
            buckets[-1][1] = sample
        if now - buckets[0][0] > self._window:
            while now - buckets[0][0] > self._window:
                buckets.popleft()
            self.value = min(b[1] for b in buckets)
        elif sample < self.value:
            self.value = sample

    def reset(self) -> None:
        """Forget every sample."""
        self._buckets.clear()
        self.value = float("inf")


@dataclass(frozen=True, slots=True)
class CongestionParams:
    """Tuning of :class:`NewReno`. Sizes in bytes, times in seconds."""

    #: Largest datagram payload (the window's unit, RFC 9002 max_datagram_size).
    max_datagram: int = 1200
    #: RFC 9002 kInitialWindow is 10 datagrams (capped at 14720 bytes).
    initial_window_frames: int = 10
    #: RFC 9002 kMinimumWindow: 2 datagrams.
    min_window_frames: int = 2
    #: Upper bound of cwnd (the link's hard in-flight cap binds first anyway).
    max_window: int = 4 * 1024 * 1024
    #: RFC 9002 kLossReductionFactor.
    loss_reduction: float = 0.5
    #: RFC 9002 kPersistentCongestionThreshold.
    persistent_threshold: int = 3
    #: A loss reduces the window only with at least ``queue_target`` of
    #: queueing delay: ``queue_delay_fraction`` of min_rtt, within
    #: [``queue_delay_min``, ``queue_delay_max``] (above the jitter a round's
    #: minimum still shows on weak/bad, below a shallow router buffer).
    queue_delay_min: float = 0.015
    queue_delay_max: float = 0.040
    queue_delay_fraction: float = 0.5
    #: Bulk-frame loss rate (an EWMA over ~16 fates) read as congestion even
    #: without a measurable queue (a buffer too shallow to show one): three
    #: times ``bad``'s random loss.
    heavy_loss: float = 0.3
    #: ``min_rtt`` is the least RTT sample of this many seconds (rule 3).
    min_rtt_window: float = 3.0
    #: Pacing gains (RFC 9002 §7.7 suggests 1.25) and the bucket depth.
    pacing_gain_slow_start: float = 2.0
    pacing_gain: float = 1.25
    pacing_burst_frames: int = 4
    #: Smallest timer the driver can keep (the bucket holds this much rate).
    granularity: float = 0.001

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field out of range."""
        if self.max_datagram < 64:
            raise ConfigError("max_datagram: must be at least 64")
        if not 1 <= self.min_window_frames <= self.initial_window_frames:
            raise ConfigError("min_window_frames: need 1 <= min <= initial_window_frames")
        if self.max_window < self.initial_window_frames * self.max_datagram:
            raise ConfigError("max_window: must be at least the initial window")
        if not 0 < self.loss_reduction < 1:
            raise ConfigError("loss_reduction: must be in (0, 1)")
        if self.persistent_threshold < 1:
            raise ConfigError("persistent_threshold: must be at least 1")
        if self.queue_delay_min < 0 or self.queue_delay_fraction < 0:
            raise ConfigError("queue_delay_min: must be >= 0 (and queue_delay_fraction too)")
        if self.queue_delay_max < self.queue_delay_min:
            raise ConfigError("queue_delay_max: must be at least queue_delay_min")
        if self.min_rtt_window <= 0:
            raise ConfigError("min_rtt_window: must be positive")
        if not 0 < self.heavy_loss <= 1:
            raise ConfigError("heavy_loss: must be in (0, 1]")
        if min(self.pacing_gain, self.pacing_gain_slow_start) < 1:
            raise ConfigError("pacing_gain: must be at least 1 (and pacing_gain_slow_start)")
        if self.pacing_burst_frames < 1:
            raise ConfigError("pacing_burst_frames: must be at least 1")


@dataclass(frozen=True, slots=True)
class BulkFate:
    """What the controller needs of one bulk frame whose fate is known."""

    time_sent: float
    size: int


@dataclass(frozen=True, slots=True)
class CongestionStats:
    """Counters of one controller."""

    cwnd: int
    ssthresh: int | None
    reductions: int  # congestion events that cut the window
    random_losses: int  # bulk frames lost without a queue: window kept
    persistent: int  # persistent-congestion collapses
    pacing_waits: int  # bulk frames that had to wait for the pacer


class NewReno:
    """RFC 9002 NewReno for bulk frames, gated by queueing delay, with a
    pacer; see the module doc. Feed it every RTT sample (:meth:`on_rtt`),
    the bulk frames sent (:meth:`on_sent`), acknowledged (:meth:`on_acked`)
    and lost (:meth:`on_lost`); ask :meth:`can_send` and
    :meth:`pacing_delay` before sending a bulk frame."""

    __slots__ = ("_base", "_bucket", "_bucket_time", "_bulk_loss", "_cut_base", "_p",
                 "_persistent", "_random", "_recovery_start", "_reductions", "_round_end",
                 "_round_mins", "_round_samples", "_round_start", "_waits", "cwnd", "ssthresh",
                 "srtt")  # fmt: skip

    def __init__(self, params: CongestionParams, initial_rtt: float) -> None:
        params.validate()
        self._p = params
        self.cwnd = min(params.initial_window_frames * params.max_datagram, 14720)
        self.cwnd = max(self.cwnd, params.min_window_frames * params.max_datagram)
        self.ssthresh: int | None = None  # infinite
        self.srtt = initial_rtt
        self._base = WindowedMin(params.min_rtt_window)
        #: The base RTT when the window was last cut (``None``: not cut since
        #: the last slow start).
        self._cut_base: float | None = None
        self._recovery_start = float("-inf")
        #: Minimum RTT of the current round (last entry) and the one before.
        self._round_mins: deque[float] = deque([float("inf")], maxlen=2)
        self._round_end = float("-inf")
        self._round_start = float("-inf")
        self._round_samples = 0
        self._bulk_loss = 0.0  # EWMA of bulk fates (1 lost, 0 acked)
        self._bucket = float(params.pacing_burst_frames * params.max_datagram)
        self._bucket_time = float("-inf")
        self._reductions = self._random = self._persistent = self._waits = 0

    # ------------------------------------------------------------ signals

    @property
    def min_rtt(self) -> float:
        """The least RTT sample of the last ``min_rtt_window`` seconds on this
        path (``inf`` before any)."""
        return self._base.value

    def on_path_change(self, now: float) -> None:
        """Datagrams now take another path (a validated roaming move, an ICE
        rebuild) from ``now``: its base RTT is unknown, so the old one and the
        round minima are forgotten, and the window starts again from slow
        start at no less than the initial window (RFC 9000 §9.4's reset,
        without dropping a larger window: for a NAT rebinding the bottleneck
        is usually the same). Frames sent before ``now`` that are declared
        lost later were lost on the old path: they start a new recovery
        period (``now``) and the heavy-loss estimate starts again, so they
        cannot cut the new path's window."""
        p = self._p
        self._recovery_start = now
        self._bulk_loss = 0.0
        self.cwnd = max(self.cwnd, min(p.initial_window_frames * p.max_datagram, 14720))
        self.ssthresh = None
        self._cut_base = None
        self._base.reset()
        self._round_mins.clear()
        self._round_mins.append(float("inf"))
        self._round_end = float("-inf")
        self._round_samples = 0

    @property
    def queue_target(self) -> float:
        """Queueing delay (s) above which a loss counts as congestion."""
        base = self.min_rtt if self.min_rtt != float("inf") else self.srtt
        p = self._p
        return min(p.queue_delay_max, max(p.queue_delay_min, p.queue_delay_fraction * base))

    @property
    def queue_delay(self) -> float:
        """Estimated standing queue (s): the least RTT of the last one or two
        round trips above the base (:attr:`min_rtt`); 0 before any sample."""
        recent = min(self._round_mins)
        if recent == float("inf") or self.min_rtt == float("inf"):
            return 0.0
        return max(0.0, recent - self.min_rtt)

    def in_slow_start(self) -> bool:
        """Whether the window is still below ssthresh."""
        return self.ssthresh is None or self.cwnd < self.ssthresh

    def on_rtt(self, sample: float, srtt: float, now: float) -> None:
        """An RTT sample (any frame: small ones cross the same queue) and the
        link's smoothed RTT after it."""
        self.srtt = srtt
        self._base.add(sample, now)
        cut = self._cut_base
        if cut is not None and self._base.value - cut >= self.queue_target:
            # The base the last cuts were judged against has left the window
            # (the path's delay rose): they were not congestion.
            self._cut_base = None
            self.ssthresh = None
        enough = self._round_samples >= ROUND_MIN_SAMPLES
        if now >= self._round_end and (enough or now >= self._round_start + ROUND_MAX_RTTS * srtt):
            self._round_mins.append(sample)
            self._round_samples = 1
            self._round_start = now
            self._round_end = now + max(srtt, self._p.granularity)
            if self.queue_delay >= 2 * self.queue_target and now > self._recovery_start + srtt:
                self._congestion(now)  # a standing queue for two rounds: like ECN-CE
            return
        self._round_samples += 1
        if sample < self._round_mins[-1]:
            self._round_mins[-1] = sample
        if (
            self._round_samples >= ROUND_MIN_SAMPLES
            and self.in_slow_start()
            and self._round_mins[-1] - self.min_rtt >= self.queue_target
        ):
            # Delay exit from slow start (HyStart: this round's minimum, not
            # two rounds', since the window doubles every round), down to the
            # window that the path carries without that queue (Vegas' view:
            # cwnd * min_rtt / rtt), since the window outgrew it meanwhile.
            rtt = self._round_mins[-1]
            floor = self._p.min_window_frames * self._p.max_datagram
            self.cwnd = max(floor, int(self.cwnd * self.min_rtt / rtt))
            self.ssthresh = self.cwnd
            self._cut_base = self.min_rtt

    # ------------------------------------------------------------ sending

    def can_send(self, bytes_in_flight: int) -> bool:
        """Whether the window admits another bulk frame."""
        return bytes_in_flight < self.cwnd

    def pacing_rate(self) -> float:
        """Bytes per second the pacer admits."""
        gain = self._p.pacing_gain_slow_start if self.in_slow_start() else self._p.pacing_gain
        return gain * self.cwnd / max(self.srtt, self._p.granularity)

    def _refill(self, now: float) -> None:
        rate = self.pacing_rate()
        p = self._p
        depth = max(p.pacing_burst_frames * p.max_datagram, rate * 2 * p.granularity)
        if now > self._bucket_time:
            elapsed = now - self._bucket_time if self._bucket_time != float("-inf") else depth
            self._bucket = min(depth, self._bucket + rate * elapsed)
            self._bucket_time = now

    def pacing_delay(self, now: float) -> float:
        """Seconds until the pacer admits a bulk frame (0: now)."""
        self._refill(now)
        if self._bucket >= -1.0:  # within a byte: float rounding, not debt
            return 0.0
        return -self._bucket / self.pacing_rate()

    def on_sent(self, size: int, now: float) -> None:
        """A bulk frame of ``size`` bytes left (the balance may go negative
        by one frame: the next waits for it)."""
        self._refill(now)
        self._bucket -= size

    def note_pacing_wait(self) -> None:
        """Count a bulk frame that was ready but waited for the pacer."""
        self._waits += 1

    # ------------------------------------------------------------ feedback

    def on_acked(self, frames: list[BulkFate]) -> None:
        """Bulk frames newly acknowledged: grow the window (RFC 9002 §7.3),
        except for frames sent before the current recovery period and while
        the queue is above twice the target (congestion avoidance only)."""
        p = self._p
        for f in frames:
            self._bulk_loss -= HEAVY_EWMA_WEIGHT * self._bulk_loss
            if f.time_sent <= self._recovery_start:
                continue
            if self.in_slow_start():
                self.cwnd += f.size
            elif self.queue_delay < 2 * self.queue_target:
                self.cwnd += p.max_datagram * f.size // self.cwnd
        self.cwnd = min(self.cwnd, p.max_window)

    def on_lost(
        self, frames: list[BulkFate], now: float, pto_base: float, last_acked_sent: float
    ) -> None:
        """Bulk frames declared lost. ``pto_base``: srtt + max(4 rttvar,
        granularity) + max_ack_delay; ``last_acked_sent``: when the latest
        acknowledged frame (any kind) was sent, for persistent congestion."""
        if not frames:
            return
        p = self._p
        for _ in frames:
            self._bulk_loss += HEAVY_EWMA_WEIGHT * (1.0 - self._bulk_loss)
        first = min(f.time_sent for f in frames)
        last = max(f.time_sent for f in frames)
        if (
            self.min_rtt != float("inf")
            and last - first > p.persistent_threshold * pto_base
            and last_acked_sent < first
        ):
            self._persistent += 1
            self.cwnd = p.min_window_frames * p.max_datagram
            self.ssthresh = self.cwnd
            self._recovery_start = now
            return
        if last <= self._recovery_start:
            return  # this recovery period already reacted
        if self.queue_delay < self.queue_target and self._bulk_loss <= p.heavy_loss:
            self._random += len(frames)
            return
        self._congestion(now)

    def _congestion(self, now: float) -> None:
        """A congestion event (RFC 9002 §7.3.2): enter recovery, cut the window."""
        p = self._p
        self._reductions += 1
        self._recovery_start = now
        self._cut_base = self._base.value
        floor = p.min_window_frames * p.max_datagram
        self.cwnd = max(floor, int(self.cwnd * p.loss_reduction))
        self.ssthresh = self.cwnd

    def stats(self) -> CongestionStats:
        """A snapshot of the window and the counters."""
        return CongestionStats(
            cwnd=self.cwnd, ssthresh=self.ssthresh, reductions=self._reductions,
            random_losses=self._random, persistent=self._persistent, pacing_waits=self._waits,
        )  # fmt: skip


__all__ = ["BulkFate", "CongestionParams", "CongestionStats", "NewReno", "WindowedMin"]
