"""Exponential backoff with full jitter, as a pure object (no sleeping here).

``delay(attempt)`` is ``U(0, min(cap, base * 2**attempt))`` (the "full jitter"
scheme), so a fleet of devices retrying after the same outage spreads out
instead of hammering the new leader in lock-step. Randomness is injected.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from raftstate.errors import Cancelled, RaftStateError

#: How gRPC words a CANCELLED status that the client side itself caused.
LOCAL_CANCEL_DETAILS = "Locally cancelled"
#: The longest RetryInfo delay the SDK obeys (a bound against a broken or
#: hostile server stalling every retry).
MAX_SERVER_DELAY_S = 5.0


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry pacing. ``base_s`` doubles per attempt up to ``cap_s``."""

    base_s: float = 0.025
    cap_s: float = 1.0
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        ceiling = min(self.cap_s, self.base_s * (2 ** min(attempt, 30)))
        return self.rng.uniform(0.0, ceiling)

    def after(self, attempt: int, err: RaftStateError | None) -> float:
        """Seconds to wait before retry ``attempt`` after ``err``: the jittered
        backoff, but never less than the server's ``RetryInfo`` delay
        (``err.retry_delay_s``; at most :data:`MAX_SERVER_DELAY_S` of it)."""
        own = self.delay(attempt)
        asked = err.retry_delay_s if err is not None else None
        if asked is None:
            return own
        return max(own, min(asked, MAX_SERVER_DELAY_S))


def retry_allowed(err: RaftStateError, *, caller_cancelling: bool) -> bool:
    """Whether the SDK may retry after ``err``. It must be retriable; a
    :class:`~raftstate.errors.Cancelled` only counts when the server
    cancelled: never while the caller's own task is being cancelled, and
    never when gRPC says the call was cancelled locally."""
    if not err.retriable:
        return False
    if isinstance(err, Cancelled):
        return not caller_cancelling and not err.message.startswith(LOCAL_CANCEL_DETAILS)
    return True
