"""Per-site-pair WAN impairment as a sans-IO scheduler: no sockets, no clock, no global random.

Theory of operation
-------------------
The emulator sees whole IPv4 packets (layer 3), so TCP, UDP and ICMP meet the
same impairment. :class:`SiteMap` classifies a packet by its source and
destination addresses into a ``(src_site, dst_site)`` *direction*; each
direction has its own :class:`Impairment` and its own state (loss chain, FIFO
floor, rate-limiter clock), so ``a → b`` and ``b → a`` never affect each other.

For one packet submitted at ``now`` (seconds on the caller's clock),
:meth:`WanScheduler.submit` takes these steps, in this order:

1. ``blackhole``: drop.
2. Loss: one step of a two-state Gilbert chain (:class:`~chaos.proxy.toxics.LossModel`,
   shared with the chaos proxy): with probability ``loss_correlation`` the
   packet shares the previous packet's fate, otherwise it is lost with
   probability ``loss``. The long-run loss rate is ``loss``; the mean loss
   burst is ``1 / ((1 - loss_correlation) * (1 - loss))`` packets.
3. Rate (``rate_kbit`` > 0): the packet joins the direction's bottleneck queue
   and leaves it after its serialization time ``8 * len / rate``
   (a token bucket with a one-packet bucket). A packet that would wait more
   than ``queue_limit_ms`` in that queue is tail-dropped, as a router would.
4. Delay: ``delay_ms ± U(jitter_ms)``, never negative, added to the time the
   packet left the bottleneck.
5. Order: unless the packet is picked for reordering, its release time is
   raised to at least the previous in-order packet's release time, so a
   direction stays FIFO *even under jitter*. Real paths rarely reorder (a flow
   usually follows one path through FIFO queues; jitter comes from queueing,
   which delays later packets too), and TCP reacts strongly to reordering
   (duplicate ACKs, spurious fast retransmits). Making jitter reorder would
   mix two effects; reordering is its own knob: with probability ``reorder``
   a packet is held an extra ``reorder_extra_ms`` and does not raise the FIFO
   floor, so later packets overtake it.
6. Duplicate: with probability ``duplicate`` a second copy is released right
   after the first.

:meth:`WanScheduler.due` hands back every packet whose release time has come,
in release order (ties in submission order); :meth:`WanScheduler.next_due`
says when the driver should call again. Random draws come only from the
injected :class:`random.Random`, in a fixed order, so a seeded run replays
exactly. Nothing here is thread-safe: drive a scheduler from one thread.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields

from chaos.proxy.toxics import LossModel

__all__ = [
    "DirectionStats",
    "Impairment",
    "ImpairmentError",
    "SiteMap",
    "WanScheduler",
    "ipv4_addresses",
]

_SITE_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}$")


class ImpairmentError(ValueError):
    """An impairment, site name or site map is invalid; the message names the field."""


@dataclass(frozen=True, slots=True)
class Impairment:
    """What one direction between two sites does to packets. Defaults: a perfect link.

    Units: milliseconds, probabilities as fractions ``0..1``, ``rate_kbit`` in
    kilobits (1000 bits) per second with 0 meaning unlimited."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    loss_correlation: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_extra_ms: float = 0.0
    rate_kbit: float = 0.0
    queue_limit_ms: float = 1000.0
    blackhole: bool = False

    def validate(self) -> Impairment:
        """Return ``self``; raise :class:`ImpairmentError` naming the field that is
        out of range."""
        for name in ("delay_ms", "jitter_ms", "reorder_extra_ms", "rate_kbit", "queue_limit_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ImpairmentError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("loss", "loss_correlation", "duplicate", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ImpairmentError(f"{name} must be a fraction in 0..1, got {value!r}")
        return self

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> Impairment:
        """Build and validate from ``{"delay_ms": 40, ...}`` (JSON or CLI).
        Raises :class:`ImpairmentError` for an unknown field or a bad value."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, float | bool] = {}
        for key, raw in values.items():
            if key not in known:
                raise ImpairmentError(f"unknown impairment field {key!r}; known: {sorted(known)}")
            if key == "blackhole":
                if isinstance(raw, str):
                    kwargs[key] = raw.strip().lower() in ("1", "true", "yes", "on")
                else:
                    kwargs[key] = bool(raw)
                continue
            if not isinstance(raw, int | float | str) or isinstance(raw, bool):
                raise ImpairmentError(f"{key} must be a number, got {raw!r}")
            try:
                kwargs[key] = float(raw)
            except ValueError as exc:
                raise ImpairmentError(f"{key} must be a number, got {raw!r}") from exc
        return cls(**kwargs).validate()  # type: ignore[arg-type]

    def to_json(self) -> dict[str, float | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class DirectionStats:
    """Counters of one direction since the scheduler was made."""

    submitted: int = 0
    lost: int = 0
    blackholed: int = 0
    queue_dropped: int = 0
    duplicated: int = 0
    reordered: int = 0


class _Direction:
    __slots__ = ("impairment", "loss", "fifo_floor", "busy_until", "counts")

    def __init__(self, impairment: Impairment) -> None:
        self.impairment = impairment
        self.loss = LossModel()
        self.fifo_floor = float("-inf")
        self.busy_until = float("-inf")
        self.counts = [0, 0, 0, 0, 0, 0]  # DirectionStats field order


_PERFECT = Impairment()


class WanScheduler:
    """Holds packets per direction and releases them when due; see the module doc.

    ``max_queued`` bounds the packets held across all directions; a packet
    submitted when it is reached is dropped (counted as ``queue_dropped``)."""

    def __init__(self, rng: random.Random, *, max_queued: int = 100_000) -> None:
        self._rng = rng
        self._max_queued = max_queued
        self._directions: dict[tuple[str, str], _Direction] = {}
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0

    # --- configuration -------------------------------------------------------

    def set_impairment(self, src_site: str, dst_site: str, impairment: Impairment) -> None:
        """Impair packets from ``src_site`` to ``dst_site`` from now on (packets
        already held keep their release times). The loss chain, FIFO floor and
        rate-limiter clock of the direction carry over. Raises
        :class:`ImpairmentError` for an invalid impairment or site name."""
        _check_site(src_site)
        _check_site(dst_site)
        impairment.validate()
        direction = self._directions.get((src_site, dst_site))
        if direction is None:
            self._directions[(src_site, dst_site)] = _Direction(impairment)
        else:
            direction.impairment = impairment

    def impairment(self, src_site: str, dst_site: str) -> Impairment:
        """The impairment of a direction (a perfect link if never set)."""
        direction = self._directions.get((src_site, dst_site))
        return _PERFECT if direction is None else direction.impairment

    def impairments(self) -> dict[tuple[str, str], Impairment]:
        return {k: d.impairment for k, d in self._directions.items()}

    def stats(self, src_site: str, dst_site: str) -> DirectionStats:
        direction = self._directions.get((src_site, dst_site))
        return DirectionStats() if direction is None else DirectionStats(*direction.counts)

    # --- data path -----------------------------------------------------------

    def submit(self, packet: bytes, src_site: str, dst_site: str, now: float) -> None:
        """Take one packet that arrived at ``now``; it comes out of :meth:`due`
        zero (dropped), one or two (duplicated) times. Never raises."""
        direction = self._directions.get((src_site, dst_site))
        if direction is None:
            direction = self._directions[(src_site, dst_site)] = _Direction(_PERFECT)
        imp = direction.impairment
        counts = direction.counts
        counts[0] += 1
        if imp.blackhole:
            counts[2] += 1
            return
        rng = self._rng
        if imp.loss > 0 and direction.loss.lost(imp.loss, imp.loss_correlation, rng):
            counts[1] += 1
            return
        if len(self._heap) >= self._max_queued:
            counts[3] += 1
            return
        at = now
        if imp.rate_kbit > 0:
            start = max(now, direction.busy_until)
            if start - now > imp.queue_limit_ms / 1000.0:
                counts[3] += 1
                return
            at = direction.busy_until = start + len(packet) * 8 / (imp.rate_kbit * 1000.0)
        delay_ms = imp.delay_ms
        if imp.jitter_ms > 0:
            delay_ms = max(0.0, delay_ms + rng.uniform(-imp.jitter_ms, imp.jitter_ms))
        at += delay_ms / 1000.0
        if imp.reorder > 0 and rng.random() < imp.reorder:
            counts[5] += 1
            at += imp.reorder_extra_ms / 1000.0
        else:
            at = max(at, direction.fifo_floor)
            direction.fifo_floor = at
        self._push(at, packet)
        if imp.duplicate > 0 and rng.random() < imp.duplicate:
            counts[4] += 1
            self._push(at, packet)

    def due(self, now: float) -> list[bytes]:
        """Remove and return every packet whose release time is ``<= now``, in
        release order (ties in submission order)."""
        heap = self._heap
        out: list[bytes] = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def next_due(self) -> float | None:
        """Release time of the earliest held packet, or ``None`` if none is held."""
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        """Packets held (duplicates count twice)."""
        return len(self._heap)

    def _push(self, at: float, packet: bytes) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, packet))


def _check_site(name: str) -> None:
    if not _SITE_NAME.match(name):
        raise ImpairmentError(f"site name must be 1-32 letters, digits or '_', got {name!r}")


# --- classification --------------------------------------------------------


def ipv4_addresses(packet: bytes) -> tuple[int, int] | None:
    """``(src, dst)`` addresses of an IPv4 packet as integers, or ``None`` if
    ``packet`` is not a well-formed IPv4 header (too short, another version, a
    header length below 5 words or beyond the packet, a total length that does
    not fit). Pure; never raises."""
    if len(packet) < 20:
        return None
    first = packet[0]
    ihl = (first & 0x0F) * 4
    if first >> 4 != 4 or ihl < 20 or ihl > len(packet):
        return None
    total = (packet[2] << 8) | packet[3]
    if total < ihl or total > len(packet):
        return None
    return int.from_bytes(packet[12:16], "big"), int.from_bytes(packet[16:20], "big")


class SiteMap:
    """Maps IPv4 addresses to site names by subnet (longest prefix wins).

    Raises :class:`ImpairmentError` from the constructor for a bad site name or CIDR."""

    def __init__(self, sites: Mapping[str, Iterable[str] | str]) -> None:
        entries: list[tuple[int, int, int, str]] = []
        for name, cidrs in sites.items():
            _check_site(name)
            for cidr in [cidrs] if isinstance(cidrs, str) else cidrs:
                try:
                    net = ipaddress.IPv4Network(cidr, strict=False)
                except ValueError as exc:
                    raise ImpairmentError(f"site {name}: bad IPv4 CIDR {cidr!r}") from exc
                entries.append((net.prefixlen, int(net.netmask), int(net.network_address), name))
        entries.sort(key=lambda e: -e[0])
        self._entries = [(mask, network, name) for _, mask, network, name in entries]

    @classmethod
    def parse(cls, spec: str) -> SiteMap:
        """From ``"a=10.1.1.0/24,b=10.1.2.0/24,a=10.9.0.0/16"`` (a site may repeat)."""
        sites: dict[str, list[str]] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, cidr = item.partition("=")
            if not sep:
                raise ImpairmentError(f"site entry {item!r} must look like name=CIDR")
            sites.setdefault(name.strip(), []).append(cidr.strip())
        return cls(sites)

    @property
    def names(self) -> list[str]:
        """Every site name, sorted."""
        return sorted({name for _, _, name in self._entries})

    def site_of(self, address: int) -> str | None:
        for mask, network, name in self._entries:
            if address & mask == network:
                return name
        return None

    def classify(self, packet: bytes) -> tuple[str, str] | None:
        """``(src_site, dst_site)`` of an IPv4 packet, or ``None`` if it is not
        IPv4 or either address is in no site. Never raises."""
        addresses = ipv4_addresses(packet)
        if addresses is None:
            return None
        src = self.site_of(addresses[0])
        dst = self.site_of(addresses[1])
        if src is None or dst is None:
            return None
        return src, dst
