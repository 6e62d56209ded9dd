"""Rate-limited logging decisions, with bounded memory: sans-IO.

Theory of operation
-------------------
A log line caused by remote input (a malformed request, a forged datagram)
must not let the sender write the disk full or grow a map without bound.
:class:`LogThrottle` answers, for one event of kind ``key`` at time ``now``,
whether to log it and how many events of that kind were held back since the
last line:

1. Per key, at most one line per ``interval`` seconds; later events of the
   same key in the interval are counted, and the count is reported on the
   key's next line.
2. Across all keys, at most ``max_lines`` lines per ``interval`` (a sender
   who varies the key, e.g. spoofed source addresses, still gets only a few
   lines); events refused for this reason are counted per key too.
3. At most ``max_keys`` keys are remembered, least recently seen evicted
   first; what an evicted key had held back is added to a global count that
   the next line reports, so nothing is silently lost from the tally.

The caller passes ``now`` (any monotonic seconds) and does the logging.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Key:
    next_at: float
    held: int


class LogThrottle:
    """Decides which rate-limited log lines to write. Not thread-safe."""

    __slots__ = ("_keys", "_lines", "_window_end", "_orphans", "interval", "max_keys", "max_lines")

    def __init__(self, interval: float, *, max_keys: int = 1024, max_lines: int = 20) -> None:
        if interval <= 0 or max_keys < 1 or max_lines < 1:
            raise ValueError("LogThrottle: interval, max_keys and max_lines must be positive")
        self.interval = interval
        self.max_keys = max_keys
        self.max_lines = max_lines
        self._keys: OrderedDict[Hashable, _Key] = OrderedDict()
        self._window_end = float("-inf")
        self._lines = 0
        self._orphans = 0  # held-back counts of evicted keys

    def __len__(self) -> int:
        return len(self._keys)

    def admit(self, key: Hashable, now: float) -> int | None:
        """``None``: do not log this event (it is counted). Otherwise log it
        now; the value is how many events (of this key, plus any of forgotten
        keys) were held back since the previous line."""
        entry = self._keys.get(key)
        if entry is not None:
            self._keys.move_to_end(key)
            if now < entry.next_at:
                entry.held += 1
                return None
        if now >= self._window_end:
            self._window_end = now + self.interval
            self._lines = 0
        if self._lines >= self.max_lines:
            if entry is None:
                entry = self._remember(key, now)
                entry.next_at = float("-inf")  # log it once the global budget allows
            entry.held += 1
            return None
        self._lines += 1
        if entry is None:
            entry = self._remember(key, now)
        held = entry.held + self._orphans
        entry.held = 0
        self._orphans = 0
        entry.next_at = now + self.interval
        return held

    def _remember(self, key: Hashable, now: float) -> _Key:
        entry = _Key(now + self.interval, 0)
        self._keys[key] = entry
        while len(self._keys) > self.max_keys:
            _, old = self._keys.popitem(last=False)
            self._orphans += old.held
        return entry


def held_suffix(held: int) -> str:
    """`` (N more like this not logged)`` or the empty string."""
    return f" ({held} more like this not logged)" if held else ""
