"""Send side of the reliable link's loss recovery: RTT estimation, loss
detection and the probe timeout (RFC 9002 §5-6, RFC 8985 RACK-TLP).

Every frame has a fresh number, and a retransmitted chunk travels in a new
frame, so every ACK of an ack-eliciting frame is an unambiguous RTT sample:
Karn's rule (RFC 6298 §3) has nothing to exclude.

* **RTT** (RFC 6298 §2 with RFC 9002 §5.3's ack-delay rule): ``srtt``,
  ``rttvar`` and ``min_rtt`` from the largest newly acked frame of each ACK.
* **Loss** (RFC 9002 §6.1): an unacked frame older than the largest acked one
  is lost once it is ``packet_threshold`` frames older, or was sent more than
  ``time_threshold * max(srtt, latest_rtt)`` ago; :attr:`LossRecovery.loss_time`
  is when the next frame still inside that reorder window must be re-checked.
* **Reordering** (RFC 8985 §6.2, simplified): a frame acked after a higher
  numbered one proves reordering; from then on the packet threshold is off
  (jitter beyond a few frame intervals would otherwise fire it constantly).
  Frames declared lost are remembered for one more ``srtt`` ("ghosts", kept
  below the advertised floor so the peer still reports them); an ACK for a
  ghost is a spurious loss: it widens the reorder window by another RTT/8
  (at most once per round trip, up to ``MAX_REORDER_MULT`` times), and the
  width returns to RTT/8 after ``REORDER_PERSIST`` loss-detection passes
  without one. Both lean toward a narrow window: for Raft's small frames a
  spurious resend costs a few bytes, a late repair holds back every later
  message.
* **PTO** (RFC 9002 §6.2): ``srtt + max(4 rttvar, granularity) +
  max_ack_delay``, clamped to ``[pto_min, pto_max]``, doubled per consecutive
  expiry only, counted from the oldest unacked frame (or the last probe).
  Counting from the oldest (not, as RFC 9002 does, the newest) frame bounds
  how long the data that blocks delivery can wait, even while newer frames
  keep leaving.
* **Loss rate**: an EWMA of frame fates (1 lost, 0 acked) that starts at
  ``initial_loss_rate``, a prior that keeps redundancy on until the path has
  shown itself. What is *reported* (:meth:`LossRecovery.measured_loss_rate`)
  is the estimate with that prior divided out, and nothing at all before
  ``MIN_LOSS_SAMPLES`` fates are known: an idle link has measured nothing,
  and must not show the prior as if it were a loss.
* **Burstiness** (Gilbert-Elliott, two states): besides the mean loss p,
  the conditional loss q = P(frame n+1 lost | frame n lost), an EWMA over
  pairs of consecutively numbered frames whose fates are both known (the
  last ``FATE_MEMORY`` fates are kept by number). On an iid path q = p; on
  the lab's ``weak`` path (3 %, correlation 0.25) q ~ 0.27, i.e. a copy in
  the very next frame fails 9x more often than the mean says.
  :func:`residual_loss` turns (p, q) into the chance that a chunk and all
  its copies, spaced ``COPY_GAPS`` frames apart, are lost.
"""

from __future__ import annotations

from dataclasses import dataclass

from raftstate.transport.frames import Ack
from raftstate.transport.outgoing import OutChunk

#: The reorder window grows to at most RTT * (1 + 8 * (time_threshold - 1)),
#: i.e. 2 RTT with the default 9/8 (RFC 8985 caps it near srtt).
MAX_REORDER_MULT = 8
#: Loss-detection passes without a spurious loss before the window shrinks
#: back (after RFC 8985 reo_wnd_persist, which counts recovery episodes).
REORDER_PERSIST = 16
#: Most ghosts remembered at once.
MAX_GHOSTS = 1024
#: Frame fates needed before a loss rate is reported: below this one loss
#: says more about chance than about the path (1 of 8 would read 12.5 %).
MIN_LOSS_SAMPLES = 32
#: Frame fates remembered by number (a ring), for the burst (q) estimate.
FATE_MEMORY = 256
#: Weight of one (lost, next) pair in the q EWMA: pairs with a lost first
#: frame are rare (3 % of frames on ``weak``), so q needs a short memory.
BURST_EWMA_WEIGHT = 1 / 32
#: q before any pair is known: a bursty path (the lab's profiles have q of
#: 0.27-0.33), so copies are spaced and sized for bursts until measured.
INITIAL_BURST_LOSS = 0.3
#: Frames between a chunk's successive copies (the first copy rides the next
#: frame, the second 2 frames later, ...): exponential spacing lets later
#: copies escape a loss burst that would take adjacent ones with it.
COPY_GAPS = (1, 2, 4, 8, 8, 8, 8, 8)


def residual_loss(p: float, q: float, copies: int) -> float:
    """P(a chunk and its ``copies`` copies are all lost) on a two-state
    Markov loss channel with mean loss ``p`` and P(lost | previous lost) =
    ``q``: ``p * prod f(g)`` over the gaps ``COPY_GAPS`` between copies,
    where ``f(g) = p + (1 - p) * lam**g`` is P(lost g frames after a loss)
    and ``lam = q - r`` with r = P(lost | previous delivered) =
    ``p (1 - q) / (1 - p)``. Inputs are clamped to [0, 1)."""
    p = min(max(p, 0.0), 0.999)
    q = min(max(q, 0.0), 0.999)
    r = p * (1 - q) / (1 - p)
    lam = q - r
    out = p
    for gap in COPY_GAPS[:copies]:
        out *= max(0.0, p + (1 - p) * lam**gap)
    return out


class RttEstimator:
    """Smoothed RTT and RTT variation. Before the first sample :attr:`srtt`
    is ``initial_rtt`` and :attr:`rttvar` half of it (RFC 6298 §2.1)."""

    __slots__ = ("has_sample", "latest", "min_rtt", "rttvar", "srtt")

    def __init__(self, initial_rtt: float) -> None:
        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.latest = 0.0
        self.min_rtt = float("inf")
        self.has_sample = False

    def update(self, sample: float, ack_delay: float) -> None:
        """Fold in ``sample`` (send to ACK arrival) whose ACK the peer held
        ``ack_delay`` (capped by the caller). The delay is subtracted only if
        the result stays >= ``min_rtt``, so an overstated delay cannot shrink
        the estimate below what the path has shown (RFC 9002 §5.3)."""
        sample = max(sample, 0.0)
        self.latest = sample
        self.min_rtt = min(self.min_rtt, sample)
        adjusted = sample - ack_delay if sample - ack_delay >= self.min_rtt else sample
        if not self.has_sample:
            self.has_sample = True
            self.srtt, self.rttvar = adjusted, adjusted / 2
            return
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - adjusted)
        self.srtt = 0.875 * self.srtt + 0.125 * adjusted


class SentFrame:
    """An ack-eliciting frame in flight."""

    __slots__ = ("bulk", "chunks", "number", "size", "time_sent")

    def __init__(
        self, number: int, time_sent: float, size: int, chunks: list[OutChunk], bulk: bool = False
    ) -> None:
        self.number = number
        self.time_sent = time_sent
        self.size = size
        self.chunks = chunks
        #: Sent under the congestion window (raftstate/transport/congestion.py).
        self.bulk = bulk


@dataclass(frozen=True, slots=True)
class RecoveryParams:
    """The loss-recovery subset of ``LinkConfig`` (see there)."""

    initial_rtt: float
    max_ack_delay: float
    time_threshold: float
    packet_threshold: int
    granularity: float
    pto_min: float
    pto_max: float
    loss_ewma_weight: float
    initial_loss_rate: float


class LossRecovery:
    """Frames in flight, and what the ACKs say became of them. Not thread-safe."""

    def __init__(self, params: RecoveryParams) -> None:
        self._p = params
        self.rtt = RttEstimator(params.initial_rtt)
        #: Outstanding ack-eliciting frames, in ascending number order.
        self.sent: dict[int, SentFrame] = {}
        self.bytes_in_flight = 0
        self.largest_acked = -1
        #: When frames inside the reorder window must be re-checked.
        self.loss_time: float | None = None
        self.pto_count = 0
        self.last_probe = float("-inf")
        #: EWMA of frame fates (1 lost, 0 acked; a spurious loss is undone).
        self.loss_rate = params.initial_loss_rate
        #: Frames whose fate (acked or lost) went into :attr:`loss_rate`.
        self.fates = 0
        self.frames_lost = 0
        self.spurious_losses = 0
        #: Sticky once seen: the packet threshold is then ignored.
        self.reordering_seen = False
        self.reorder_mult = 1
        self._episodes_since_spurious = 0
        self._widened_at = float("-inf")
        #: Frames recently declared lost -> when, in ascending number order.
        self._ghosts: dict[int, float] = {}
        #: EWMA of P(frame n+1 lost | frame n lost) (see residual_loss).
        self.burst_loss = INITIAL_BURST_LOSS
        #: (lost, next) pairs that went into :attr:`burst_loss`.
        self.burst_samples = 0
        #: Recent fates by frame number, a ring: slot n % FATE_MEMORY holds
        #: frame n's fate (1 acked, 2 lost) if _fate_num there is n.
        self._fate_num = [-1] * FATE_MEMORY
        self._fate_val = bytearray(FATE_MEMORY)

    def floor(self, next_number: int) -> int:
        """The lowest frame number whose ACK still matters (outstanding, or
        a ghost whose ACK would reveal a spurious loss)."""
        floor = next(iter(self.sent), next_number)
        return min(floor, next(iter(self._ghosts), floor))

    def on_sent(self, frame: SentFrame) -> None:
        """Track an ack-eliciting frame just sent."""
        self.sent[frame.number] = frame
        self.bytes_in_flight += frame.size

    def on_ack(self, ack: Ack, now: float) -> tuple[list[SentFrame], list[SentFrame]]:
        """Apply ``ack`` (validated by the caller against frames sent).
        Returns ``(newly_acked, newly_lost)``."""
        acked: list[SentFrame] = []
        ranges = ack.ranges
        ri = 0
        for number, frame in self.sent.items():  # both ascending: one merge pass
            if number >= ack.cum:
                while ri < len(ranges) and ranges[ri][1] <= number:
                    ri += 1
                if ri == len(ranges):
                    break
                if ranges[ri][0] > number:
                    continue
            acked.append(frame)
        largest = ack.largest
        if acked and acked[0].number < self.largest_acked:
            self.reordering_seen = True  # acked after a higher-numbered frame
        self._check_ghosts(ack, now)
        for frame in acked:
            del self.sent[frame.number]
            self.bytes_in_flight -= frame.size
            self._note_fate(0.0, frame.number)
            if frame.number == largest:
                delay = min(ack.delay_us / 1e6, self._p.max_ack_delay)
                self.rtt.update(now - frame.time_sent, delay)
        if acked:
            self.pto_count = 0
        self.largest_acked = max(self.largest_acked, largest)
        return acked, self.detect_losses(now)

    def detect_losses(self, now: float) -> list[SentFrame]:
        """Declare and forget the frames that are lost as of ``now``; re-arm
        :attr:`loss_time` for those still inside the reorder window."""
        self.loss_time = None
        if not self.sent or self.largest_acked < 0:
            return []
        p = self._p
        rtt = max(self.rtt.srtt, self.rtt.latest)
        window = max(rtt * (1 + (p.time_threshold - 1) * self.reorder_mult), p.granularity)
        threshold = 0 if self.reordering_seen else p.packet_threshold
        lost: list[SentFrame] = []
        for number, frame in self.sent.items():
            if number > self.largest_acked:
                break
            if frame.time_sent + window <= now or (
                threshold and self.largest_acked - number >= threshold
            ):
                lost.append(frame)
            elif self.loss_time is None or frame.time_sent + window < self.loss_time:
                self.loss_time = frame.time_sent + window
        for frame in lost:
            del self.sent[frame.number]
            self.bytes_in_flight -= frame.size
            self.frames_lost += 1
            self._note_fate(1.0, frame.number)
            self._ghosts[frame.number] = now
        if lost:
            self._episodes_since_spurious += 1
            if self._episodes_since_spurious >= REORDER_PERSIST:
                self.reorder_mult = 1
        return lost

    def pto_interval(self) -> float:
        """The current probe timeout, backoff included."""
        p = self._p
        base = self.rtt.srtt + max(4 * self.rtt.rttvar, p.granularity) + p.max_ack_delay
        base = min(max(base, p.pto_min), p.pto_max)
        return float(min(base * (1 << min(self.pto_count, 16)), p.pto_max))

    def pto_deadline(self) -> float | None:
        """When to probe, or ``None`` with nothing in flight."""
        if not self.sent:
            return None
        oldest = next(iter(self.sent.values())).time_sent
        return max(oldest, self.last_probe) + self.pto_interval()

    def on_probe(self, now: float) -> None:
        """A PTO expired and a probe is being sent: back off."""
        self.pto_count += 1
        self.last_probe = now

    def _check_ghosts(self, ack: Ack, now: float) -> None:
        """Count ghosts ``ack`` covers as spurious losses; forget old ones."""
        ghosts = self._ghosts
        if not ghosts:
            return
        expiry = now - max(self.rtt.srtt, self.rtt.latest)
        while ghosts and (len(ghosts) > MAX_GHOSTS or next(iter(ghosts.values())) < expiry):
            del ghosts[next(iter(ghosts))]
        spurious = _covered(ghosts, ack)
        for number in spurious:
            del ghosts[number]
            slot = number % FATE_MEMORY
            if self._fate_num[slot] == number:
                self._fate_val[slot] = 1  # it was not lost after all
        if spurious:
            self.spurious_losses += len(spurious)
            self.reordering_seen = True
            self._episodes_since_spurious = 0
            if now >= self._widened_at + self.rtt.srtt:  # widen once per round trip
                self._widened_at = now
                self.reorder_mult = min(self.reorder_mult + 1, MAX_REORDER_MULT)
            w = self._p.loss_ewma_weight
            self.loss_rate = max(0.0, self.loss_rate - w * len(spurious))

    def measured_loss_rate(self) -> float | None:
        """The loss rate measured on this link: :attr:`loss_rate` without the
        ``initial_loss_rate`` prior (after n fates the prior's weight is
        ``(1 - w)^n``; the fates' weights sum to the rest), clamped to
        [0, 1]. ``None`` before ``MIN_LOSS_SAMPLES`` fates are known."""
        n = self.fates
        if n < MIN_LOSS_SAMPLES:
            return None
        decay = (1.0 - self._p.loss_ewma_weight) ** n
        measured = (self.loss_rate - self._p.initial_loss_rate * decay) / (1.0 - decay)
        return min(1.0, max(0.0, measured))

    def _note_fate(self, lost: float, number: int) -> None:
        self.fates += 1
        self.loss_rate += self._p.loss_ewma_weight * (lost - self.loss_rate)
        nums, vals = self._fate_num, self._fate_val
        slot = number % FATE_MEMORY
        prev = (number - 1) % FATE_MEMORY
        if nums[prev] == number - 1 and vals[prev] == 2:  # (lost, this) pair
            self._note_pair(lost > 0.5)
        if lost > 0.5:
            after = (number + 1) % FATE_MEMORY
            if nums[after] == number + 1:  # (this lost, next) pair
                self._note_pair(vals[after] == 2)
        nums[slot] = number
        vals[slot] = 2 if lost > 0.5 else 1

    def _note_pair(self, second_lost: bool) -> None:
        self.burst_samples += 1
        self.burst_loss += BURST_EWMA_WEIGHT * (float(second_lost) - self.burst_loss)


def _covered(numbers: dict[int, float], ack: Ack) -> list[int]:
    """The keys of ``numbers`` (ascending) that ``ack`` covers: one merge
    pass over both ascending sequences, not a scan of the ranges per key."""
    out: list[int] = []
    cum, ranges = ack.cum, ack.ranges
    ri, count = 0, len(ranges)
    for n in numbers:
        if n < cum:
            out.append(n)
            continue
        while ri < count and ranges[ri][1] <= n:
            ri += 1
        if ri == count:
            break
        if ranges[ri][0] <= n:
            out.append(n)
    return out
