"""Toxics as sans-IO state machines: no sockets, no clock, no global random.

Theory of operation
-------------------
A toxic is a named, typed set of numeric attributes attached to one *stream*
of a proxy (``upstream`` = client → server, ``downstream`` = server → client),
following Toxiproxy 2.x's model and units. ``toxicity`` is the probability
that a toxic applies to a given connection (for UDP: a given client mapping);
the roll is made once per connection when the connection first sees the toxic
(:class:`ToxicityRoll`).

The data path asks a pipe what to do and gets back *actions* with absolute
times on the caller's clock:

* :class:`StreamPipe` (TCP, one per direction per connection) turns a chunk
  read at ``now`` into :class:`Send` and :class:`Close` actions. Stages run in
  a fixed order: ``timeout`` (drop everything), ``limit_data`` (truncate, then
  close), ``latency`` (sum of every latency toxic; each draws its own jitter),
  ``bandwidth`` (pace at ``rate`` KB/s, 1 KB = 1000 bytes, in slices of at most
  100 ms worth), ``slicer`` (split into ``average_size ± size_variation`` byte
  writes spaced ``delay`` µs). Send times never go backwards, so TCP order is
  kept even under jitter.
* :class:`DatagramPipe` (UDP, one per direction per client mapping) turns one
  datagram into zero, one or two :class:`Send` actions: ``packet_loss``,
  ``latency``, ``reorder``, ``bandwidth``, ``duplicate``. Datagrams may overtake
  each other (jitter, reorder), as on a real network.

The driver executes actions at their time. All randomness comes from the
injected :class:`random.Random`, so a seeded run is reproducible.

UDP toxic attributes (our extension; Toxiproxy is TCP-only):

* ``packet_loss``: ``loss_rate`` is a **fraction 0..1** (not a percentage);
  ``correlation`` (fraction 0..1) is the probability that a datagram repeats the
  previous datagram's fate instead of rolling afresh, which makes losses bursty
  while keeping the long-run loss rate at ``loss_rate``.
* ``duplicate``: ``probability`` (fraction 0..1) that a datagram is sent twice.
* ``reorder``: ``probability`` (fraction 0..1) that a datagram is held back an
  extra ``delay`` ms, letting later datagrams overtake it.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "TCP_TOXIC_ATTRIBUTES",
    "UDP_TOXIC_ATTRIBUTES",
    "attribute_problem",
    "Close",
    "DatagramPipe",
    "LossModel",
    "Send",
    "Stream",
    "StreamPipe",
    "ToxicSpec",
    "ToxicityRoll",
    "bandwidth_slices",
    "latency_delay_s",
    "slice_sizes",
]

#: Toxic type → attribute names, for TCP proxies (Toxiproxy's names and units).
TCP_TOXIC_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "bandwidth": ("rate",),
    "slow_close": ("delay",),
    "timeout": ("timeout",),
    "reset_peer": ("timeout",),
    "slicer": ("average_size", "size_variation", "delay"),
    "limit_data": ("bytes",),
}

#: Toxic type → attribute names, for UDP proxies (our extension).
UDP_TOXIC_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "latency": ("latency", "jitter"),
    "packet_loss": ("loss_rate", "correlation"),
    "bandwidth": ("rate",),
    "duplicate": ("probability",),
    "reorder": ("probability", "delay"),
}


#: Largest value per attribute name (``(type, name)`` first): generous for
#: any test, small enough that no timer or pacing computation overflows.
#: Every attribute is at least 0; fractions are at most 1.
_HOUR_MS = 3_600_000
ATTRIBUTE_MAX: Mapping[tuple[str, str] | str, float] = {
    ("slicer", "delay"): _HOUR_MS * 1000,  # µs
    "latency": _HOUR_MS,
    "jitter": _HOUR_MS,
    "delay": _HOUR_MS,
    "timeout": _HOUR_MS,
    "rate": 100_000_000,  # KB/s: 100 GB/s
    "bytes": 1 << 50,
    "average_size": 1 << 30,
    "size_variation": 1 << 30,
    "loss_rate": 1.0,
    "correlation": 1.0,
    "probability": 1.0,
}


def attribute_problem(kind: str, name: str, value: float) -> str | None:
    """Why ``value`` is not acceptable for attribute ``name`` of a ``kind``
    toxic (NaN, infinite, negative or beyond :data:`ATTRIBUTE_MAX`), else
    ``None``. Toxiproxy treats a bandwidth ``rate`` <= 0 as unlimited; we
    accept 0 for that and refuse negatives."""
    if value != value or value in (float("inf"), float("-inf")):
        return f"{value!r} is not a finite number"
    if value < 0:
        return f"{value!r} is negative"
    limit = ATTRIBUTE_MAX.get((kind, name), ATTRIBUTE_MAX.get(name, _HOUR_MS))
    if value > limit:
        return f"{value!r} exceeds the maximum {limit:g}"
    return None


class Stream(enum.Enum):
    UPSTREAM = "upstream"
    DOWNSTREAM = "downstream"


@dataclass(frozen=True, slots=True)
class ToxicSpec:
    """One toxic as the API shows it. ``attributes`` holds every attribute of
    the type (missing ones are 0)."""

    name: str
    type: str
    stream: Stream
    toxicity: float
    attributes: Mapping[str, float] = field(default_factory=dict)

    def attr(self, key: str) -> float:
        return float(self.attributes.get(key, 0))

    def to_json(self) -> dict[str, object]:
        return {
            "attributes": dict(self.attributes),
            "name": self.name,
            "type": self.type,
            "stream": self.stream.value,
            "toxicity": self.toxicity,
        }


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the far side at time ``at``."""

    at: float
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection at time ``at``; ``reset`` means with a TCP RST."""

    at: float
    reset: bool = False


Action = Send | Close


def latency_delay_s(latency_ms: float, jitter_ms: float, rng: random.Random) -> float:
    """Seconds to delay one chunk: ``latency ± U(jitter)``, never negative."""
    delay = latency_ms
    if jitter_ms > 0:
        delay += rng.uniform(-jitter_ms, jitter_ms)
    return max(0.0, delay) / 1000.0


def bandwidth_slices(length: int, rate_kbps: float) -> list[int]:
    """Split ``length`` bytes into pieces of at most 100 ms worth at ``rate_kbps``
    KB/s, so a large chunk trickles out instead of arriving as one late burst.
    A rate ≤ 0 means unlimited (one piece)."""
    if rate_kbps <= 0 or length <= 0:
        return [length] if length > 0 else []
    piece = max(1, int(rate_kbps * 100))  # KB/s * 0.1 s * 1000 B/KB
    return [min(piece, length - i) for i in range(0, length, piece)]


def slice_sizes(
    length: int, average_size: float, size_variation: float, rng: random.Random
) -> list[int]:
    """Sizes (summing to ``length``) of the writes a slicer makes: each is
    ``average_size ± U(size_variation)`` clamped to ``[1, remaining]``. An
    ``average_size`` ≤ 0 disables slicing."""
    if length <= 0:
        return []
    avg = int(average_size)
    if avg <= 0:
        return [length]
    var = max(0, min(int(size_variation), avg - 1))
    sizes: list[int] = []
    remaining = length
    while remaining > 0:
        size = avg + (rng.randint(-var, var) if var else 0)
        size = max(1, min(size, remaining))
        sizes.append(size)
        remaining -= size
    return sizes


class ToxicityRoll:
    """Decides, once per (connection, toxic), whether a toxic applies. A toxic
    whose toxicity changes is rolled again."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._rolled: dict[str, tuple[float, bool]] = {}

    def filter(self, toxics: Iterable[ToxicSpec]) -> list[ToxicSpec]:
        kept: list[ToxicSpec] = []
        seen: set[str] = set()
        for toxic in toxics:
            seen.add(toxic.name)
            previous = self._rolled.get(toxic.name)
            if previous is None or previous[0] != toxic.toxicity:
                applies = toxic.toxicity >= 1.0 or self._rng.random() < toxic.toxicity
                previous = (toxic.toxicity, applies)
                self._rolled[toxic.name] = previous
            if previous[1]:
                kept.append(toxic)
        for gone in set(self._rolled) - seen:
            del self._rolled[gone]
        return kept


class StreamPipe:
    """One direction of one TCP connection. Not thread-safe."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._toxics: list[ToxicSpec] = []
        self._armed: set[str] = set()  # timeout/reset_peer toxics already timed
        self._last_at = float("-inf")
        self._busy_until = float("-inf")
        self._passed = 0
        self.closed = False

    @property
    def toxics(self) -> Sequence[ToxicSpec]:
        return tuple(self._toxics)

    def set_toxics(self, now: float, toxics: Sequence[ToxicSpec]) -> list[Close]:
        """Install the toxics that apply to this direction (already filtered by
        toxicity). Returns the timers this change starts: ``timeout`` closes
        ``timeout`` ms after it arrived (0 = never), ``reset_peer`` resets after
        ``timeout`` ms, and removing a timeout toxic closes the connection."""
        actions: list[Close] = []
        names = {t.name for t in toxics}
        for old in self._toxics:
            if old.type == "timeout" and old.name not in names:
                actions.append(Close(now))
        for toxic in toxics:
            if toxic.name in self._armed:
                continue
            if toxic.type == "timeout":
                self._armed.add(toxic.name)
                if toxic.attr("timeout") > 0:
                    actions.append(Close(now + toxic.attr("timeout") / 1000.0))
            elif toxic.type == "reset_peer":
                self._armed.add(toxic.name)
                actions.append(Close(now + max(0.0, toxic.attr("timeout")) / 1000.0, reset=True))
        self._armed &= names
        self._toxics = list(toxics)
        return actions

    def feed(self, now: float, data: bytes) -> list[Action]:
        """Actions for a chunk read at ``now``."""
        if self.closed or not data:
            return []
        types = [t.type for t in self._toxics]
        if "timeout" in types:
            return []
        actions: list[Action] = []
        close = False
        limits = [t.attr("bytes") for t in self._toxics if t.type == "limit_data"]
        if limits:
            allowed = max(0, int(min(limits)) - self._passed)
            if allowed <= len(data):
                data = data[:allowed]
                close = True
        self._passed += len(data)

        at = now
        for toxic in self._toxics:
            if toxic.type == "latency":
                at += latency_delay_s(toxic.attr("latency"), toxic.attr("jitter"), self._rng)
        pieces: list[tuple[float, bytes]] = [(at, data)] if data else []
        for toxic in self._toxics:
            if toxic.type == "bandwidth" and toxic.attr("rate") > 0:
                pieces = self._pace(pieces, toxic.attr("rate"))
        for toxic in self._toxics:
            if toxic.type == "slicer":
                pieces = self._slice(pieces, toxic)
        for piece_at, piece in pieces:
            piece_at = max(piece_at, self._last_at)
            self._last_at = piece_at
            actions.append(Send(piece_at, piece))
        if close:
            self.closed = True
            actions.append(Close(max(now, self._last_at)))
        return actions

    def on_eof(self, now: float) -> list[Action]:
        """The reading side closed: close after pending data, plus the sum of
        ``slow_close`` delays."""
        if self.closed:
            return []
        self.closed = True
        delay = sum(t.attr("delay") for t in self._toxics if t.type == "slow_close") / 1000.0
        return [Close(max(now, self._last_at) + max(0.0, delay))]

    def _pace(self, pieces: list[tuple[float, bytes]], rate: float) -> list[tuple[float, bytes]]:
        out: list[tuple[float, bytes]] = []
        bytes_per_s = rate * 1000.0
        for at, data in pieces:
            offset = 0
            for size in bandwidth_slices(len(data), rate):
                start = max(at, self._busy_until)
                self._busy_until = start + size / bytes_per_s
                out.append((self._busy_until, data[offset : offset + size]))
                offset += size
        return out

    def _slice(
        self, pieces: list[tuple[float, bytes]], toxic: ToxicSpec
    ) -> list[tuple[float, bytes]]:
        out: list[tuple[float, bytes]] = []
        step = max(0.0, toxic.attr("delay")) / 1e6
        for at, data in pieces:
            offset = 0
            sizes = slice_sizes(
                len(data), toxic.attr("average_size"), toxic.attr("size_variation"), self._rng
            )
            for i, size in enumerate(sizes):
                out.append((at + i * step, data[offset : offset + size]))
                offset += size
        return out


class LossModel:
    """Correlated loss: with probability ``correlation`` a datagram shares the
    previous datagram's fate, otherwise it is lost with probability
    ``loss_rate``. The stationary loss rate is ``loss_rate`` for any
    correlation < 1; mean burst length grows as correlation → 1."""

    def __init__(self) -> None:
        self._last_lost = False

    def lost(self, loss_rate: float, correlation: float, rng: random.Random) -> bool:
        loss_rate = min(1.0, max(0.0, loss_rate))
        correlation = min(1.0, max(0.0, correlation))
        if loss_rate >= 1.0 or loss_rate <= 0.0:
            self._last_lost = loss_rate >= 1.0
        elif correlation > 0 and rng.random() < correlation:
            pass
        else:
            self._last_lost = rng.random() < loss_rate
        return self._last_lost


class DatagramPipe:
    """One direction of one UDP client mapping. Not thread-safe."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._toxics: list[ToxicSpec] = []
        self._loss: dict[str, LossModel] = {}
        self._busy_until = float("-inf")

    def set_toxics(self, toxics: Sequence[ToxicSpec]) -> None:
        self._toxics = list(toxics)
        names = {t.name for t in toxics}
        self._loss = {k: v for k, v in self._loss.items() if k in names}

    def feed(self, now: float, datagram: bytes) -> list[Send]:
        """Zero (lost), one or two (duplicated) sends for one datagram."""
        at = now
        copies = 1
        for toxic in self._toxics:
            kind = toxic.type
            if kind == "packet_loss":
                model = self._loss.setdefault(toxic.name, LossModel())
                if model.lost(toxic.attr("loss_rate"), toxic.attr("correlation"), self._rng):
                    return []
            elif kind == "latency":
                at += latency_delay_s(toxic.attr("latency"), toxic.attr("jitter"), self._rng)
            elif kind == "reorder":
                if self._rng.random() < toxic.attr("probability"):
                    at += max(0.0, toxic.attr("delay")) / 1000.0
            elif kind == "duplicate":
                if self._rng.random() < toxic.attr("probability"):
                    copies += 1
        for toxic in self._toxics:
            if toxic.type == "bandwidth" and toxic.attr("rate") > 0:
                start = max(at, self._busy_until)
                self._busy_until = start + len(datagram) * copies / (toxic.attr("rate") * 1000.0)
                at = self._busy_until
        return [Send(at, datagram)] * copies
