"""A reliable, ordered, de-duplicated message link over datagrams (sans-IO).

Theory of operation
-------------------
pysyncobj assumes a TCP-like channel: every message arrives once, in order,
or the connection breaks. Over raw datagrams a late AppendEntries makes a
follower truncate acknowledged entries, and TCP's own recovery (RTO >= 200 ms,
doubling) puts commit latency into seconds on a lossy WAN. :class:`ReliableLink`
gives one peer pair that contract, with repairs that cost a frame interval
(redundancy) or about one RTT (loss detection), not an RTO. It does no I/O and
reads no clock: ``now`` (seconds) is passed in. Use one link per peer per
session; when :meth:`ReliableLink.dead` turns true the driver resets the
session, and both ends start new links.

Guarantee: the peer's :meth:`~ReliableLink.receive` returns the messages given
to :meth:`~ReliableLink.send` exactly once each, in order, or the link is
eventually declared dead. "In order" is relaxed only for messages sent with
``ordered=False``: such a message may overtake earlier *unordered* ones, never
an ordered one (:mod:`~raftstate.transport.outgoing`, "barrier"). The AEAD
envelope below authenticates every frame; garbage is still counted and
dropped here, never raised.

Steps (after QUIC, RFC 9000/9002; RACK-TLP, RFC 8985; RTP redundancy, RFC 2198):

1. **Stream.** Messages become one byte stream, ``varint(len) || message``
   each; frames carry chunks of it at explicit offsets, so small messages
   share a chunk and a large one spans many (format:
   :mod:`~raftstate.transport.frames`). The receiver reassembles it
   (:mod:`~raftstate.transport.reassembly`), so duplicates and reordering
   cannot reach the application. The sender keeps each chunk as one object
   however many frames carry it (:mod:`~raftstate.transport.outgoing`).
2. **Frame numbers.** Every frame has a new number and a retransmitted chunk
   goes in a new frame: RTT samples are never ambiguous, and "a later frame
   was acked" is a comparison.
3. **ACKs** (:mod:`~raftstate.transport.acks`): cumulative number + SACK
   ranges in every frame; at once on a gap, else within ``max_ack_delay``.
4. **Loss detection and PTO** (:mod:`~raftstate.transport.recovery`): RACK
   time threshold (RTT/8 reorder window, widened when losses prove spurious)
   and packet threshold (off once reordering is seen); probe timeout
   ``srtt + 4 rttvar + max_ack_delay`` from the oldest unacked frame. Lost
   chunks are resent lowest offset first (that one blocks delivery); a probe
   resends the oldest unacked chunks and asks for an immediate ACK.
5. **Redundancy.** A loss under repair holds back every later ordered
   message, so data frames carry copies of recent chunks in their spare room
   and a burst's unacked tail gets tail frames (``tail_copy_fraction * srtt``,
   then doubling). The copy count per chunk comes from the measured loss p
   and burst loss q (:func:`~raftstate.transport.recovery.residual_loss`,
   target ``redundancy_target``, at most ``redundancy_max``), and the copies
   are spaced ``COPY_GAPS`` (1, 2, 4) frames apart so that a loss burst does
   not take them all. A chunk of half a frame or more rarely fits a data
   frame's spare room (a heartbeat of a few KiB fills whole frames), so its
   due copies go at once in frames of their own, up to one per data frame
   just sent (measured in the lab, 0-2 KiB states on ``weak``: p99 243 ->
   166 ms, for 1.8x the wire bytes). Bulk (a catch-up) pays nothing; a clean
   path sends no copies.
6. **Flow.** Data frames (not probes) wait while ``max_inflight_bytes`` or
   ``max_inflight_frames`` are unacked, retransmissions included: the hard
   flood guard. New data stays within ``receive_window`` bytes of the
   lowest unacked byte, which bounds what the receiver buffers.
   **Congestion control** (``congestion_control``): a data frame built
   while more than one frame's worth is ready (new bytes plus queued
   retransmissions) is *bulk* and also waits for the NewReno window and the
   pacer (:mod:`~raftstate.transport.congestion`); a frame built with less
   ready (the trickle of small Raft messages) is sent at once. Only bulk
   frames' fates move the window.
7. **Liveness.** :meth:`ReliableLink.dead`: data waited ``dead_after``
   seconds without ACK progress.

Timers run inside :meth:`~ReliableLink.poll_transmit`. Call it after every
:meth:`~ReliableLink.send` (or batch of sends: messages queued together
share frames), after every :meth:`~ReliableLink.receive`, and at
:meth:`~ReliableLink.next_timeout`.
"""

from __future__ import annotations

from collections import deque

import grpc

from raftstate.errors import ConfigError
from raftstate.transport.acks import AckTracker
from raftstate.transport.congestion import BulkFate, CongestionParams, NewReno
from raftstate.transport.crypto import MAX_PAYLOAD, TransportError
from raftstate.transport.frames import (
    MAX_CHUNK_LENGTH,
    MAX_CHUNKS,
    MAX_VARINT_SIZE,
    SINGLE_CHUNK_OVERHEAD,
    FrameError,
    StreamChunk,
    decode_frame,
    encode_fields,
    varint_size,
)
from raftstate.transport.linkconfig import LinkConfig, LinkStats
from raftstate.transport.outgoing import OutChunk, OutgoingStream, fit
from raftstate.transport.reassembly import Reassembler, StreamOverflow
from raftstate.transport.recovery import COPY_GAPS, LossRecovery, SentFrame, residual_loss
from raftstate.transport.rxloss import RxLossMeter

_MIN_MAX_PAYLOAD = SINGLE_CHUNK_OVERHEAD + 64
#: At most this many frames of copies per :meth:`ReliableLink.poll_transmit`
#: (copies of chunks too large for a data frame's spare room).
COPY_FRAMES_MAX = 4
_DEFAULT_CONFIG = LinkConfig()
#: Chunks whose redundant copies are tracked at once (oldest forgotten).
MAX_GUARDED = 32


class _Guarded:
    """A chunk sent as data (new or retransmitted) that is owed ``left``
    more redundant copies; the next may ride frame ``due`` or later."""

    __slots__ = ("chunk", "due", "left", "sent")

    def __init__(self, chunk: OutChunk, left: int, due: int) -> None:
        self.chunk = chunk
        self.left = left
        self.due = due
        self.sent = 0  # copies sent so far


class MessageTooLarge(TransportError):
    """The message exceeds ``LinkConfig.max_message_bytes``; split it."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    retriable = False


class ReliableLink:
    """Both directions with one peer: :meth:`send` and :meth:`poll_transmit`
    toward it, :meth:`receive` from it. Pure and deterministic; not
    thread-safe (use it from the transport's event loop)."""

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, *, config: LinkConfig = _DEFAULT_CONFIG
    ) -> None:
        """``max_payload``: the largest frame the envelope below can seal.
        Raises :class:`ConfigError` for an invalid ``config`` or a
        ``max_payload`` below 113 bytes."""
        config.validate()
        if max_payload < _MIN_MAX_PAYLOAD:
            raise ConfigError(f"max_payload: must be at least {_MIN_MAX_PAYLOAD}")
        self.config = config
        self.max_payload = max_payload
        #: A chunk this size fits a frame of its own, whatever the ACK size.
        self._max_chunk = min(max_payload - SINGLE_CHUNK_OVERHEAD, MAX_CHUNK_LENGTH)
        self._max_record = self._max_chunk + 2 * MAX_VARINT_SIZE + 2  # + offset, length, tag
        self._recovery = LossRecovery(config.recovery_params())
        self._acks = AckTracker(
            max_ack_delay=config.max_ack_delay,
            threshold=config.ack_eliciting_threshold,
            max_ranges=config.max_ack_ranges,
        )
        #: Loss of the frames the peer sends us (its numbers that never came).
        self._rx_loss = RxLossMeter()
        self._stream = Reassembler(config.max_message_bytes)
        self._cc: NewReno | None = None
        if config.congestion_control:
            params = CongestionParams(
                max_datagram=max_payload,
                max_window=max(config.max_inflight_bytes, 16 * max_payload),
            )
            self._cc = NewReno(params, config.initial_rtt)
        #: A bulk backlog is being sent (see poll_transmit).
        self._bulk_mode = False
        #: When a bulk frame waiting for the pacer may go (``None``: none waits).
        self._pace_at: float | None = None
        #: Send time of the latest-sent frame acknowledged so far.
        self._last_acked_sent = float("-inf")
        self._out = OutgoingStream()
        self._next_number = 0
        #: Chunks recently sent as new data or retransmissions that are owed
        #: redundant copies, oldest first.
        self._guard: deque[_Guarded] = deque(maxlen=MAX_GUARDED)
        self._tail_at: float | None = None
        self._tail_gap = 0.0
        #: (fates, burst samples) the cached copy count was computed for.
        self._copies_key = (-1, -1)
        self._copies_now = config.redundancy
        self._progress_time = 0.0
        self._failure: str | None = None
        self._frames_sent = self._ack_frames_sent = self._frames_received = 0
        self._retransmissions = self._redundant = self._probes = 0
        self._redundant_bytes = 0
        self._duplicates = self._malformed = self._window_drops = 0
        self._messages_sent = self._messages_delivered = self._send_rejected = 0

    # ------------------------------------------------------------ public API

    @property
    def srtt(self) -> float | None:
        """Smoothed RTT in seconds, ``None`` before the first sample."""
        return self._recovery.rtt.srtt if self._recovery.rtt.has_sample else None

    @property
    def rttvar(self) -> float | None:
        """RTT variation in seconds, ``None`` before the first sample."""
        return self._recovery.rtt.rttvar if self._recovery.rtt.has_sample else None

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of sent ack-eliciting frames neither acked nor lost."""
        return self._recovery.bytes_in_flight

    @property
    def buffered(self) -> int:
        """Stream bytes queued or sent and not yet acknowledged."""
        return self._out.buffered

    @property
    def failure(self) -> str | None:
        """Why the peer broke the protocol (the link is dead), else ``None``."""
        return self._failure

    def send(self, message: bytes, now: float, *, ordered: bool = True) -> bool:
        """Queue ``message`` for in-order, exactly-once delivery. With
        ``ordered=False`` (a small message the application can take out of
        order) it may overtake earlier *unordered* messages still under
        repair, never an ordered one. Returns
        ``False`` (queueing nothing) when the send buffer lacks room; retry
        once ACKs drained it. Raises :class:`MessageTooLarge` past
        ``max_message_bytes``."""
        size = len(message)
        if size > self.config.max_message_bytes:
            raise MessageTooLarge(
                f"message of {size} bytes exceeds max_message_bytes "
                f"({self.config.max_message_bytes}); send it in pieces"
            )
        if self._out.buffered + varint_size(size) + size > self.config.send_buffer_bytes:
            self._send_rejected += 1
            return False
        if self._out.buffered == 0:
            self._progress_time = now
        self._out.push(message, ordered=ordered)
        self._messages_sent += 1
        return True

    def receive(self, payload: bytes, now: float) -> list[bytes]:
        """Consume one authenticated payload from the peer; return the
        messages it completes, in order (often none). Never raises: garbage
        counts as ``malformed``; duplicate and stale frames change nothing."""
        try:
            frame = decode_frame(payload)
        except FrameError:
            self._malformed += 1
            return []
        ack = frame.ack
        if ack is not None and max(ack.cum, ack.largest + 1) > self._next_number:
            self._malformed += 1  # acknowledges frames never sent
            return []
        if self._failure is not None:
            return []
        limit = self._stream.contiguous + self.config.receive_window
        for chunk in frame.chunks:
            if chunk.offset + len(chunk.data) > limit:
                self._window_drops += 1  # not recorded: the peer will resend it
                return []
        late = frame.number < self._acks.base  # received, or given up by the peer
        if not late and self._acks.seen(frame.number):
            self._duplicates += 1
            return []
        self._acks.on_frame(
            frame.number, frame.floor, ack_eliciting=frame.ack_eliciting,
            ack_now=frame.ack_now, now=now,
        )  # fmt: skip
        self._rx_loss.on_frame(frame.number)
        if ack is not None:
            acked, lost = self._recovery.on_ack(ack, now)
            if acked:
                self._progress_time = now
                if self._cc is not None:
                    self._cc_acked(acked, now)
            for sent in acked:
                self._out.on_frame_acked(sent.chunks)
            for sent in lost:
                self._out.on_frame_lost(sent.chunks)
            if lost and self._cc is not None:
                self._cc_lost(lost, now)
        stream = self._stream
        known = stream.duplicate_bytes
        unordered: list[StreamChunk] = []
        for chunk in frame.chunks:
            if chunk.barrier >= 0:
                unordered.append(chunk)
            else:
                stream.add(chunk.offset, chunk.data)
        try:
            messages = stream.messages()
            if unordered:
                for chunk in unordered:
                    early = stream.add_unordered(chunk.offset, chunk.data, chunk.barrier)
                    if early is None:
                        stream.add(chunk.offset, chunk.data)
                    else:
                        messages.extend(early)
                messages.extend(stream.messages())
        except StreamOverflow as exc:
            self._failure = str(exc)
            return []
        if late and stream.duplicate_bytes - known == sum(len(c.data) for c in frame.chunks):
            self._duplicates += 1  # nothing new: most likely a network duplicate
        else:
            self._frames_received += 1
        self._messages_delivered += len(messages)
        return messages

    def poll_transmit(self, now: float) -> list[bytes]:
        """Run due timers and return the payloads to send now, each at most
        ``max_payload`` bytes: a probe if the PTO expired, retransmissions
        and new data while the in-flight cap allows, a tail copy, or a bare
        ACK if one is owed and nothing else carried it. Afterwards
        :meth:`next_timeout` is ``None`` or later than ``now``."""
        rec = self._recovery
        if self._idle(now):
            return []
        cc = self._cc
        out: list[bytes] = []
        if rec.loss_time is not None and now >= rec.loss_time:
            lost_frames = rec.detect_losses(now)
            for lost in lost_frames:
                self._out.on_frame_lost(lost.chunks)
            if lost_frames and cc is not None:
                self._cc_lost(lost_frames, now)
        deadline = rec.pto_deadline()
        if deadline is not None and now >= deadline:
            rec.on_probe(now)
            self._probes += 1
            out.append(self._build(now, self._probe_chunks(), ack_now=True))
        copies = self._copies()
        sent = False
        data_frames = 0
        bulk_sent = False
        self._pace_at = None
        while self._cap_open():
            ready = self._out.pending_bytes + self._out.retx_bytes
            # bulk from the moment more than bulk_threshold_bytes are ready
            # until the backlog is down to one frame (the tail of a catch-up
            # is paced too); Raft's own traffic never reaches the threshold
            if ready > max(self._max_chunk, self.config.bulk_threshold_bytes):
                self._bulk_mode = True
            elif ready <= self._max_chunk:
                self._bulk_mode = False
            bulk = cc is not None and self._bulk_mode
            if cc is not None and bulk:
                if not cc.can_send(rec.bytes_in_flight):
                    break  # an ACK or a loss verdict opens the window
                wait = cc.pacing_delay(now)
                if wait > 0:
                    cc.note_pacing_wait()
                    self._pace_at = now + max(wait, self.config.granularity)
                    break
            chunks = self._out.pop_retransmits(self._max_record)
            self._retransmissions += len(chunks)
            new = self._new_data_allowed(chunks)
            if not chunks and not new:
                break
            in_flight = len(rec.sent)
            out.append(self._build(now, chunks, new_data=new, copies=copies, bulk=bulk))
            if len(rec.sent) == in_flight:
                break  # defensive: nothing fitted after all
            sent = True
            data_frames += 1
            bulk_sent = bulk_sent or self._bulk_mode
        if sent and copies and not bulk_sent:
            # Copies the data frames had no room for (a message of a frame or
            # more fills them): the due ones of at least half a frame go now,
            # in frames of their own (at most one per data frame just sent and
            # COPY_FRAMES_MAX, one copy of a chunk per call), so a lost full
            # frame costs a frame interval, not a loss-detection round trip.
            # Not in a call that sent bulk (a catch-up pays no copies).
            done: list[OutChunk] = []
            for _ in range(min(data_frames, COPY_FRAMES_MAX)):
                if not self._cap_open():
                    break
                due = self._copies_owed(
                    self._next_number, self._max_record, done, min_size=self._max_record // 2
                )
                if not due:
                    break
                done.extend(due)
                self._redundant += len(due)
                self._redundant_bytes += sum(c.record_size for c in due)
                out.append(self._build(now, due))
        if sent and copies:
            self._tail_gap = self._tail_delay()
            self._tail_at = now + self._tail_gap
        elif self._tail_at is not None and now >= self._tail_at:
            self._tail_at = None
            tail = self._copies_owed(None, self._max_record, ())
            if tail and self._cap_open():
                self._redundant += len(tail)
                self._redundant_bytes += sum(c.record_size for c in tail)
                out.append(self._build(now, tail))
                if any(g.left > 0 and not g.chunk.acked for g in self._guard):
                    self._tail_gap *= 2  # spaced like the copies: escape a burst
                    self._tail_at = now + self._tail_gap
        owed = self._acks.deadline
        if not out and owed is not None and now >= owed:
            out.append(self._build(now, []))
        return out

    def path_changed(self, now: float, *, new_path: bool = True) -> None:
        """Datagrams now take a new path (an ICE rebuild): forget the probe
        backoff so the next probe goes out at once, and restart the stall and
        dead clocks (:meth:`stalled`, :meth:`dead`) so the new path is judged
        on its own: without that, data that waited on the old path made the
        driver suspect the new one the moment it came up and rebuild it again
        (seen after a NAT remap: ~0.5 s lost). RTT estimates are kept; the
        next ACKs correct them. With ``new_path`` (a validated move or an ICE
        rebuild, not merely the peer getting through again) the congestion
        controller also starts over on the new path
        (:meth:`NewReno.on_path_change`)."""
        rec = self._recovery
        rec.pto_count = 0
        rec.last_probe = float("-inf")
        self._progress_time = now
        if new_path and self._cc is not None:
            self._cc.on_path_change(now)

    def next_timeout(self) -> float | None:
        """When :meth:`poll_transmit` must run next even if nothing arrives
        (ACK timer, loss timer, probe timeout, tail copy, pacer), or ``None``."""
        first = self._recovery.pto_deadline()
        for t in (self._acks.deadline, self._recovery.loss_time, self._tail_at, self._pace_at):
            if t is not None and (first is None or t < first):
                first = t
        return first

    def stalled(self, now: float) -> float:
        """Seconds data has been waiting without ACK progress; 0 when
        nothing waits."""
        if self._out.buffered == 0:
            return 0.0
        return max(0.0, now - self._progress_time)

    def dead(self, now: float) -> bool:
        """True once data waited ``dead_after`` seconds with no ACK progress,
        or the peer broke the protocol. The driver then resets the session."""
        if self._failure is not None:
            return True
        return self._out.buffered > 0 and now - self._progress_time >= self.config.dead_after

    def stats(self) -> LinkStats:
        """A snapshot of the counters and estimates."""
        rec, rtt = self._recovery, self._recovery.rtt
        cc = self._cc.stats() if self._cc is not None else None
        return LinkStats(
            srtt=rtt.srtt if rtt.has_sample else None,
            rttvar=rtt.rttvar if rtt.has_sample else None,
            min_rtt=rtt.min_rtt if rtt.has_sample else None,
            pto=rec.pto_interval(),
            loss_rate=rec.loss_rate,
            redundancy=self._copies(),
            bytes_in_flight=rec.bytes_in_flight,
            frames_in_flight=len(rec.sent),
            buffered_bytes=self._out.buffered,
            frames_sent=self._frames_sent,
            ack_frames_sent=self._ack_frames_sent,
            frames_received=self._frames_received,
            frames_lost=rec.frames_lost,
            spurious_losses=rec.spurious_losses,
            retransmissions=self._retransmissions,
            redundant_chunks=self._redundant,
            probes=self._probes,
            duplicates=self._duplicates,
            duplicate_bytes=self._stream.duplicate_bytes,
            malformed=self._malformed,
            window_drops=self._window_drops,
            messages_sent=self._messages_sent,
            messages_delivered=self._messages_delivered,
            send_rejected=self._send_rejected,
            redundant_bytes=self._redundant_bytes,
            loss_measured=rec.measured_loss_rate(),
            burst_loss=rec.burst_loss,
            rx_loss=self._rx_loss.loss(),
            rx_burst=self._rx_loss.burst(),
            cwnd=cc.cwnd if cc else None,
            cc_reductions=cc.reductions if cc else 0,
            cc_random_losses=cc.random_losses if cc else 0,
            cc_pacing_waits=cc.pacing_waits if cc else 0,
        )

    # ------------------------------------------------------------ congestion

    def _cc_acked(self, acked: list[SentFrame], now: float) -> None:
        cc, rtt = self._cc, self._recovery.rtt
        assert cc is not None
        self._last_acked_sent = max(self._last_acked_sent, max(f.time_sent for f in acked))
        if rtt.has_sample:
            cc.on_rtt(rtt.latest, rtt.srtt, now)
        bulk = [BulkFate(f.time_sent, f.size) for f in acked if f.bulk]
        if bulk:
            cc.on_acked(bulk)

    def _cc_lost(self, lost: list[SentFrame], now: float) -> None:
        bulk = [BulkFate(f.time_sent, f.size) for f in lost if f.bulk]
        if not bulk:
            return  # small frames' losses are repaired, not congestion
        cc, rtt, cfg = self._cc, self._recovery.rtt, self.config
        assert cc is not None
        base = rtt.srtt + max(4 * rtt.rttvar, cfg.granularity) + cfg.max_ack_delay
        cc.on_lost(bulk, now, base, self._last_acked_sent)

    # ------------------------------------------------------------ sending

    def _idle(self, now: float) -> bool:
        """Nothing for :meth:`poll_transmit` to do at ``now``: no data or
        retransmission queued and no timer due. The common case after a
        received frame whose ACK may wait; checked first because it is cheap."""
        out, rec = self._out, self._recovery
        if out.pending_bytes or out.has_retransmits:
            return False
        for t in (self._acks.deadline, rec.loss_time, self._tail_at):
            if t is not None and now >= t:
                return False
        deadline = rec.pto_deadline()
        return deadline is None or now < deadline

    def _cap_open(self) -> bool:
        rec = self._recovery
        return (
            rec.bytes_in_flight < self.config.max_inflight_bytes
            and len(rec.sent) < self.config.max_inflight_frames
        )

    def _copies(self) -> int:
        """Redundant copies per chunk: the fewest (within the configured
        bounds) whose residual loss, for the measured mean loss p and burst
        loss q (:func:`~raftstate.transport.recovery.residual_loss`), is at
        most ``redundancy_target``. Recomputed every 16 fates or new pair."""
        rec, cfg = self._recovery, self.config
        key = (rec.fates >> 4, rec.burst_samples)  # every 16 fates, or a new pair
        if key == self._copies_key:
            return self._copies_now
        p, q = rec.loss_rate, rec.burst_loss
        copies = cfg.redundancy
        while copies < cfg.redundancy_max and residual_loss(p, q, copies) > cfg.redundancy_target:
            copies += 1
        self._copies_key, self._copies_now = key, copies
        return copies

    def _copies_owed(
        self,
        number: int | None,
        room: int,
        primary: tuple[OutChunk, ...] | list[OutChunk],
        taken: int = 0,
        min_size: int = 0,
    ) -> list[OutChunk]:
        """Copies for one frame, newest chunk first (its first copy is the
        one that repairs a single loss within a frame), that fit ``room`` bytes
        beside ``taken`` chunks: every guarded chunk not acked, not in
        ``primary``, still owed a copy and (unless ``number`` is ``None``: a
        tail frame) due by frame ``number``. Each taken copy is counted and
        its next one scheduled ``COPY_GAPS`` frames later."""
        guard = self._guard
        while guard and (guard[0].left <= 0 or guard[0].chunk.acked):
            guard.popleft()
        out: list[OutChunk] = []
        for g in reversed(guard):
            if taken + len(out) >= MAX_CHUNKS:
                break
            chunk = g.chunk
            if g.left <= 0 or chunk.acked or (number is not None and g.due > number):
                continue
            if chunk.record_size > room or chunk.record_size < min_size:
                continue
            if chunk in primary or chunk in out:
                continue
            out.append(chunk)
            room -= chunk.record_size
            g.left -= 1
            g.sent += 1
            base = self._next_number if number is None else number
            g.due = base + COPY_GAPS[min(g.sent, len(COPY_GAPS) - 1)]
        return out

    def _tail_delay(self) -> float:
        cfg = self.config
        return max(cfg.tail_copy_min, cfg.tail_copy_fraction * self._recovery.rtt.srtt)

    def _new_data_allowed(self, chunks: list[OutChunk]) -> bool:
        if not self._out.pending_bytes or len(chunks) >= MAX_CHUNKS:
            return False
        return self._window_left() > 0

    def _window_left(self) -> int:
        """New stream bytes the receive window still admits."""
        out = self._out
        return out.lowest_unacked() + self.config.receive_window - out.next_offset

    def _probe_chunks(self) -> list[OutChunk]:
        """The oldest unacked chunks that fit one frame, for a PTO probe."""
        candidates = self._out.queued()
        for frame in self._recovery.sent.values():
            candidates.extend(frame.chunks)
        chunks = fit(candidates, self._max_record)
        self._retransmissions += len(chunks)
        return chunks

    def _build(
        self,
        now: float,
        chunks: list[OutChunk],
        *,
        new_data: bool = False,
        ack_now: bool = False,
        copies: int = 0,
        bulk: bool = False,
    ) -> bytes:
        """Encode one frame: ``chunks``, then new stream data, then copies of
        recent chunks in the spare room, with the freshest ACK that fits.
        Tracks it in flight if ack-eliciting."""
        number = self._next_number
        floor = self._recovery.floor(number)
        room = self.max_payload - (3 + varint_size(number) + varint_size(number - floor))
        for c in chunks:
            room -= c.record_size
        ack = self._acks.block(now, room)
        space = room - ack[1] if ack is not None else room
        if new_data:
            out = self._out
            while out.pending_bytes and len(chunks) < MAX_CHUNKS:
                # offset, length and tag: the tag is at most offset + 1
                head = 2 * varint_size(out.next_offset + 1) + 2
                size = min(space - head, out.pending_bytes, self._window_left(), self._max_chunk)
                cut = out.cut(size, force=not chunks) if size > 0 else None
                if cut is None:
                    break
                chunks = [*chunks, cut]
                space -= cut.record_size
        if copies:
            primary = chunks
            extra = (
                self._copies_owed(number, space, primary, taken=len(chunks)) if self._guard else []
            )
            if extra:
                self._redundant += len(extra)
                self._redundant_bytes += sum(c.record_size for c in extra)
                chunks = primary + extra
            self._guard.extend(_Guarded(c, copies, number + 1) for c in primary)
        payload = encode_fields(number, floor, ack[0] if ack else None, chunks, ack_now)
        self._next_number += 1
        self._frames_sent += 1
        if ack is not None:
            self._acks.on_ack_sent()
        if chunks or ack_now:
            for c in chunks:
                c.in_flight += 1
            self._recovery.on_sent(SentFrame(number, now, len(payload), chunks, bulk))
            if bulk and self._cc is not None:
                self._cc.on_sent(len(payload), now)
        else:
            self._ack_frames_sent += 1
        return payload
