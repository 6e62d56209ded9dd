"""A deterministic in-memory lossy datagram network with a virtual clock.

The in-memory twin of the UDP path (CONVENTIONS §2): endpoints are names with
a handler; each direction between two endpoints has a :class:`LinkProfile`
(delay, jitter, correlated loss, duplication, reordering); partitions cut
groups apart. Nothing reads the wall clock or the global ``random``: time is
:attr:`SimNetwork.now`, advanced only by :meth:`SimNetwork.run_until`, and all
chance comes from the injected ``random.Random``. Same seed, same calls: same
run, datagram for datagram.

:class:`SimLinkHost` drives :class:`~raftstate.transport.reliable.ReliableLink`
objects over it the way the UDP driver will: poll after every send, receive
and timer.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from raftstate.errors import ConfigError
from raftstate.transport.crypto import MAX_PAYLOAD
from raftstate.transport.linkconfig import LinkConfig
from raftstate.transport.reliable import ReliableLink

#: ``handler(source, payload)``, called at delivery time.
Handler = Callable[[str, bytes], None]
#: ``drop(src, dst, payload) -> bool``: see :meth:`SimNetwork.set_drop_filter`.
DropFilter = Callable[[str, str, bytes], bool]


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one direction treats datagrams. Times in seconds.

    * ``delay`` + uniform(-``jitter``, +``jitter``), at least 0, is each
      datagram's transit time. With ``fifo`` (the default, like a router
      queue) a datagram never overtakes one sent before it on this
      direction, so jitter delays the ones behind it too; without, every
      datagram is independent and jitter reorders.
    * ``loss``: long-run drop probability. ``loss_correlation`` in [0, 1)
      makes drops bursty (a two-state Gilbert model with the same mean):
      after a drop, the next one is dropped with probability
      ``loss + loss_correlation * (1 - loss)``.
    * ``duplicate``: probability a datagram is delivered twice (the copy
      takes its own transit time).
    * ``reorder``: probability a datagram skips the FIFO order and is held an
      extra uniform(0, ``reorder_delay``), so later ones overtake it.
    * ``rate`` (bytes/s, 0: unlimited): a bottleneck. A datagram that got
      past the loss draw joins the direction's queue and leaves it after
      its serialization time ``len / rate``; one that would wait more than
      ``queue_limit`` seconds is tail-dropped (``queue_drops``), as a router
      would (and as the lab's WAN emulator does). The delay counts from
      when it left the queue. Directions whose ``queue`` names agree share
      one bottleneck (e.g. a site's uplink toward two peers); "" is a queue
      of the direction's own.
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    loss_correlation: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.010
    fifo: bool = True
    rate: float = 0.0
    queue_limit: float = 1.0
    queue: str = ""

    @classmethod
    def from_rtt(
        cls, rtt: float, rtt_jitter: float = 0.0, loss: float = 0.0, **kw: Any
    ) -> LinkProfile:
        """One direction of a symmetric path with round-trip ``rtt`` ±
        ``rtt_jitter``: half of each per direction, ``loss`` per direction;
        ``kw`` sets the other fields."""
        return cls(delay=rtt / 2, jitter=rtt_jitter / 2, loss=loss, **kw)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        for name in ("delay", "jitter", "reorder_delay", "rate", "queue_limit"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name}: must be a finite number >= 0, got {value}")
        for name in ("loss", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"{name}: must be a probability in [0, 1], got {value}")
        if not 0 <= self.loss_correlation < 1:
            raise ConfigError("loss_correlation: must be in [0, 1)")


@dataclass(slots=True)
class DirectionStats:
    """What happened to datagrams sent on one direction."""

    sent: int = 0
    lost: int = 0
    cut: int = 0  # dropped by a partition
    duplicated: int = 0
    delivered: int = 0
    queue_drops: int = 0  # tail drops at the bottleneck (``rate``)
    max_queue: float = 0.0  # longest wait in the bottleneck queue, seconds
    bytes_sent: int = 0  # bytes that left the bottleneck (or all, without one)


class _Direction:
    __slots__ = ("busy_until", "fifo_time", "last_lost", "profile", "stats")

    def __init__(self, profile: LinkProfile) -> None:
        self.profile = profile
        self.fifo_time = 0.0
        self.busy_until = 0.0
        self.last_lost = False
        self.stats = DirectionStats()


class SimNetwork:
    """Endpoints, per-direction profiles, partitions and a virtual clock.
    Single-threaded; handlers and callbacks run inside :meth:`run_until`."""

    def __init__(
        self, rng: random.Random, *, default: LinkProfile | None = None, start: float = 0.0
    ) -> None:
        self._rng = rng
        self._default = default or LinkProfile()
        self._default.validate()
        self._now = start
        self._seq = 0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._handlers: dict[str, Handler] = {}
        self._directions: dict[tuple[str, str], _Direction] = {}
        self._cuts: set[tuple[str, str]] = set()
        self._drop_filter: DropFilter | None = None
        #: Shared bottleneck queues (LinkProfile.queue): when each is free.
        self._queues: dict[str, float] = {}

    @property
    def now(self) -> float:
        """Virtual time, seconds."""
        return self._now

    def add_endpoint(self, name: str, handler: Handler) -> None:
        """Register ``name``; ``handler(source, payload)`` gets its datagrams.
        Raises :class:`ConfigError` if the name is taken."""
        if name in self._handlers:
            raise ConfigError(f"endpoint {name!r} already exists")
        self._handlers[name] = handler

    def set_profile(self, src: str, dst: str, profile: LinkProfile, *, both: bool = True) -> None:
        """Use ``profile`` from ``src`` to ``dst`` (and back, if ``both``)."""
        profile.validate()
        self._direction(src, dst).profile = profile
        if both:
            self._direction(dst, src).profile = profile

    def stats(self, src: str, dst: str) -> DirectionStats:
        """Counters of the ``src`` -> ``dst`` direction."""
        return self._direction(src, dst).stats

    def partition(self, side: Iterable[str], other: Iterable[str] | None = None) -> None:
        """Cut every path between ``side`` and ``other`` (default: all other
        endpoints), both ways. Datagrams in transit across a cut are lost."""
        a = set(side)
        b = set(other) if other is not None else set(self._handlers) - a
        self._cuts |= {(x, y) for x in a for y in b} | {(y, x) for x in a for y in b}

    def block(self, src: str, dst: str) -> None:
        """Cut the one direction ``src`` -> ``dst``."""
        self._cuts.add((src, dst))

    def heal(self) -> None:
        """Remove every cut."""
        self._cuts.clear()

    def set_drop_filter(self, drop: DropFilter | None) -> None:
        """Drop every datagram for which ``drop(src, dst, payload)`` is true
        at send time (counted as lost), before the profile applies; for
        tests that lose one chosen datagram. ``None`` removes it."""
        self._drop_filter = drop

    def send(self, src: str, dst: str, payload: bytes) -> None:
        """Hand ``payload`` to the network at :attr:`now`. Raises
        :class:`ConfigError` for an unknown destination."""
        if dst not in self._handlers:
            raise ConfigError(f"unknown endpoint {dst!r}")
        d = self._direction(src, dst)
        d.stats.sent += 1
        if (src, dst) in self._cuts:
            d.stats.cut += 1
            return
        if self._drop_filter is not None and self._drop_filter(src, dst, payload):
            d.stats.lost += 1
            return
        p, rng = d.profile, self._rng
        # Gilbert model: q = P(drop | last dropped); P(drop | last delivered)
        # = loss (1 - q) / (1 - loss) keeps the long-run mean at ``loss``.
        q = p.loss + p.loss_correlation * (1 - p.loss)
        if d.last_lost or p.loss >= 1:
            drop_p = q
        else:
            drop_p = p.loss * (1 - q) / (1 - p.loss)
        d.last_lost = rng.random() < drop_p
        if d.last_lost:
            d.stats.lost += 1
            return
        left = self._now
        if p.rate > 0:
            busy = self._queues.get(p.queue, 0.0) if p.queue else d.busy_until
            start = max(self._now, busy)
            if start - self._now > p.queue_limit:
                d.stats.queue_drops += 1
                return
            d.stats.max_queue = max(d.stats.max_queue, start - self._now)
            left = start + len(payload) / p.rate
            if p.queue:
                self._queues[p.queue] = left
            else:
                d.busy_until = left
        d.stats.bytes_sent += len(payload)
        copies = 2 if p.duplicate and rng.random() < p.duplicate else 1
        d.stats.duplicated += copies - 1
        for _ in range(copies):
            transit = max(0.0, p.delay + (rng.uniform(-p.jitter, p.jitter) if p.jitter else 0.0))
            at = left + transit
            if p.reorder and rng.random() < p.reorder:
                at += rng.uniform(0.0, p.reorder_delay)
            elif p.fifo:
                at = max(at, d.fifo_time)
                d.fifo_time = at
            self._schedule(at, functools.partial(self._deliver, src, dst, payload))

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` at virtual time ``when`` (now, if earlier)."""
        self._schedule(max(when, self._now), callback)

    def run_until(self, until: float) -> int:
        """Process events in time order up to and including ``until``; the
        clock ends at ``until``. Returns the number of events processed."""
        count = 0
        while self._events and self._events[0][0] <= until:
            when, _, callback = heapq.heappop(self._events)
            self._now = when
            callback()
            count += 1
        self._now = max(self._now, until)
        return count

    def idle(self) -> bool:
        """Whether no event is scheduled."""
        return not self._events

    def _direction(self, src: str, dst: str) -> _Direction:
        d = self._directions.get((src, dst))
        if d is None:
            d = self._directions[(src, dst)] = _Direction(self._default)
        return d

    def _schedule(self, when: float, callback: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, callback))

    def _deliver(self, src: str, dst: str, payload: bytes) -> None:
        d = self._direction(src, dst)
        if (src, dst) in self._cuts:
            d.stats.cut += 1
            return
        d.stats.delivered += 1
        self._handlers[dst](src, payload)


#: ``on_message(peer, message)``, called when a link delivers.
MessageHandler = Callable[[str, bytes], None]


class SimLinkHost:
    """One endpoint of a :class:`SimNetwork` with a :class:`ReliableLink` per
    peer, driven like the real transport: after each send, each datagram and
    each timer it calls ``poll_transmit`` and arms a wake-up at
    ``next_timeout``. ``on_message(peer, message)`` receives deliveries.

    Sessions stand in for the AEAD envelope's: each datagram is prefixed
    with a 4-byte session number (simulation framing only). :meth:`reset`
    starts a new session; the peer adopts the higher number when it sees it
    (dropping its own link, as a new HELLO replaces a session) and datagrams
    of older sessions are dropped, so nothing crosses a reset."""

    def __init__(
        self,
        net: SimNetwork,
        name: str,
        on_message: MessageHandler,
        *,
        config: LinkConfig | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.net = net
        self.name = name
        self._on_message = on_message
        self._config = config or LinkConfig()
        self._max_payload = max_payload
        self.links: dict[str, ReliableLink] = {}
        self._session: dict[str, int] = {}
        self._wake: dict[str, float] = {}
        #: Datagrams dropped because they belonged to an older session.
        self.stale = 0
        net.add_endpoint(name, self._on_datagram)

    def link(self, peer: str) -> ReliableLink:
        """The link to ``peer`` in the current session, created on first use."""
        link = self.links.get(peer)
        if link is None:
            link = self.links[peer] = ReliableLink(self._max_payload, config=self._config)
        return link

    def reset(self, peer: str) -> None:
        """Start a new session with ``peer``: what the driver does when the
        link is dead. Messages queued on the old link are lost."""
        self._session[peer] = self._session.get(peer, 0) + 1
        self.links.pop(peer, None)

    def send(self, peer: str, message: bytes, *, ordered: bool = True) -> bool:
        """Queue ``message`` to ``peer`` and flush. ``False``: buffer full.
        ``ordered``: as :meth:`ReliableLink.send`."""
        ok = self.link(peer).send(message, self.net.now, ordered=ordered)
        self.flush(peer)
        return ok

    def flush(self, peer: str) -> None:
        """Transmit what the link to ``peer`` has due and re-arm its timer.
        Raises ``RuntimeError`` if the link asks to be woken in the past."""
        link = self.links.get(peer)
        if link is None:
            return
        now = self.net.now
        prefix = self._session.get(peer, 0).to_bytes(4, "big")
        for payload in link.poll_transmit(now):
            self.net.send(self.name, peer, prefix + payload)
        when = link.next_timeout()
        if when is None:
            return
        if when <= now:
            raise RuntimeError(f"link to {peer!r} broke its timer contract: {when} <= {now}")
        armed = self._wake.get(peer)
        if armed is not None and now < armed <= when:
            return  # an earlier wake-up is pending; it re-arms this one
        self._wake[peer] = when
        self.net.call_at(when, lambda: self._on_timer(peer, when))

    def _on_timer(self, peer: str, when: float) -> None:
        if self._wake.get(peer) == when:
            del self._wake[peer]
        self.flush(peer)

    def _on_datagram(self, src: str, datagram: bytes) -> None:
        session = int.from_bytes(datagram[:4], "big")
        current = self._session.get(src, 0)
        if session < current:
            self.stale += 1
            return
        if session > current:  # the peer started a new session
            self._session[src] = session
            self.links.pop(src, None)
        for message in self.link(src).receive(datagram[4:], self.net.now):
            self._on_message(src, message)
        self.flush(src)
