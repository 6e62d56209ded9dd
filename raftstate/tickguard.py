"""Tick guard: every exception escaping a Raft tick is counted and acted on.

Theory of operation. pysyncobj's tick thread catches any exception from
``_onTick``, logs it with a traceback and tries again 20 ms later, forever:
a handler that raises on every tick makes the node log 40 tracebacks a
second while it still answers as a healthy follower (or leader). raftstate
wraps the tick (``RaftNode._onTick``) and feeds each outcome to
:class:`TickGuard`, which decides:

* what to log: the traceback the first time a kind of failure is seen (kind
  = exception type + where it was raised), then at most one summary line per
  ``log_interval_s``;
* whether the node is failing: a failure within the last ``failing_window_s``
  (health then reports NOT_SERVING);
* when to act: after ``limit`` consecutive failing ticks, once. The node then
  steps down if it leads and exits with :data:`EXIT_TICK_FAILURES` so its
  supervisor restarts it from its verified snapshot and journal (see
  docs/architecture.md "Persistence and durability" for why a restart).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Process exit status after ``tick_failure_limit`` consecutive failing ticks
#: (EX_TEMPFAIL: "try again"; supervisors restart on it).
EXIT_TICK_FAILURES = 75


@dataclass(frozen=True, slots=True)
class TickVerdict:
    """What to do about one failed tick."""

    #: First failure of this kind: log it with its traceback.
    log_traceback: bool
    #: A rate-limited summary line is due.
    log_summary: bool
    #: ``limit`` consecutive failures reached: step down / restart (once).
    act: bool


class TickGuard:
    """Counts tick failures. Tick thread writes; other threads may read the
    counters (plain attribute reads)."""

    def __init__(
        self, limit: int, *, log_interval_s: float = 5.0, failing_window_s: float = 1.0
    ) -> None:
        self.limit = limit
        self.log_interval_s = log_interval_s
        self.failing_window_s = failing_window_s
        #: Every failed tick since start.
        self.total = 0
        self.consecutive = 0
        #: ``"ExcType: message"`` of the most recent failure ("" if none).
        self.last_error = ""
        self._kinds: set[str] = set()
        self._last_failure: float | None = None
        self._last_summary: float | None = None
        self._acted = False

    def on_failure(self, kind: str, text: str, now: float) -> TickVerdict:
        """Record a tick that raised; ``kind`` identifies where and what."""
        self.total += 1
        self.consecutive += 1
        self.last_error = text
        self._last_failure = now
        first = kind not in self._kinds
        self._kinds.add(kind)
        summary = not first and (
            self._last_summary is None or now - self._last_summary >= self.log_interval_s
        )
        if first or summary:
            self._last_summary = now
        act = not self._acted and self.consecutive >= self.limit
        self._acted = self._acted or act
        return TickVerdict(log_traceback=first, log_summary=summary, act=act)

    def on_success(self) -> None:
        """Record a tick that completed."""
        self.consecutive = 0

    def failing(self, now: float) -> bool:
        """Whether a tick failed within the last ``failing_window_s``."""
        return self._last_failure is not None and (
            self.consecutive > 0 or now - self._last_failure < self.failing_window_s
        )


__all__ = ["EXIT_TICK_FAILURES", "TickGuard", "TickVerdict"]
