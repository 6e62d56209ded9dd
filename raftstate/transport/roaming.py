"""Roaming: move a peer's send path to a new source address, after validating it (sans-IO).

Theory of operation
-------------------
A NAT that remaps its ports (a reboot, a conntrack flush, a device moving to
another network) changes the source address a peer's datagrams come from
while the security session above the path stays the same. WireGuard follows
such a peer to its new address as soon as an authentic packet arrives from
there; QUIC (RFC 9000 §8.2, §9) first *validates* the new path. This module
does the latter, per peer:

1. The transport hands :meth:`PathValidator.on_authentic` every DATA datagram
   that the channel authenticated *and* found fresh (inside the replay window
   of the current session, :class:`~raftstate.transport.crypto.ReplayWindow`),
   with its source address. A datagram from the current address changes
   nothing. So does a forged one (it never authenticates) or a replayed one
   (the replay window drops it before it gets here): neither can start a
   challenge, let alone move the path.
2. An authentic datagram from a *new* source starts a validation, if the
   rate limit allows (a token bucket of ``burst`` challenges refilled at
   ``challenges_per_s``, per peer) and the datagram is at least as large as
   the challenge (no amplification: RFC 9000 §8.2.1's concern): the driver
   sends a PATH_CHALLENGE with a fresh random nonce, sealed under the
   session, to that address, and keeps sending everything else on the old
   path meanwhile. A newer source replaces a pending validation.
3. The peer answers a PATH_CHALLENGE with a PATH_RESPONSE echoing the nonce,
   sent to where the challenge came from. :meth:`on_response` switches the
   path (returns :class:`Switch`) only for the pending nonce *from the
   challenged address* before ``timeout``: an attacker who replays or
   redirects old datagrams can make us send at most a rate-limited number of
   small challenges, and can never make us switch.
4. :meth:`poll` resends the pending challenge (same nonce, at most
   ``resends`` times, every ``resend_interval``: a lost challenge must not
   cost the whole timeout) and reports a validation that timed out
   (:class:`Failed`); the driver then falls back to rebuilding the path
   through the rendezvous (ICE).

Challenge and response payloads are :data:`CHALLENGE_SIZE` bytes: one type
byte (:data:`PATH_CHALLENGE` or :data:`PATH_RESPONSE`, outside the reliable
link's frame formats, whose first byte is ``0x5?``) and an 8-byte nonce. They
bypass the reliable link: a lost challenge is simply followed by the next
authentic datagram from the new address (rate limit permitting).

Addresses are opaque hashable values (``(host, port)`` tuples in practice).
Nothing here reads a clock or draws random numbers: ``now`` and the nonce
source are inputs. Not thread-safe (the transport's event loop owns it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from raftstate.errors import ConfigError

#: First payload byte of a path challenge / response (inside a sealed DATA datagram).
PATH_CHALLENGE = 0x61
PATH_RESPONSE = 0x62
NONCE_SIZE = 8
#: Payload bytes of a challenge or a response.
CHALLENGE_SIZE = 1 + NONCE_SIZE

Address = Hashable
RandomBytes = Callable[[int], bytes]


@dataclass(frozen=True, slots=True)
class RoamingConfig:
    """``timeout``: seconds a validation may take before :meth:`PathValidator.poll`
    reports it failed. ``challenges_per_s`` / ``burst``: the per-peer token
    bucket of challenges. ``min_trigger_size``: an authentic datagram smaller
    than this (sealed bytes) never triggers a challenge, so a challenge (whose
    sealed size it should be at least) never amplifies what caused it."""

    timeout: float = 1.0
    challenges_per_s: float = 4.0
    burst: int = 2
    min_trigger_size: int = 0
    resends: int = 3
    resend_interval: float = 0.1

    def validate(self) -> None:
        """Raises :class:`ConfigError` naming the field that is out of range."""
        if not self.timeout > 0:
            raise ConfigError(f"roaming.timeout: must be > 0, got {self.timeout}")
        if not self.challenges_per_s > 0:
            raise ConfigError(f"roaming.challenges_per_s: must be > 0, got {self.challenges_per_s}")
        if self.burst < 1:
            raise ConfigError(f"roaming.burst: must be >= 1, got {self.burst}")
        if self.resends < 0 or not self.resend_interval > 0:
            raise ConfigError(
                "roaming.resends / resend_interval: must be >= 0 and > 0, got "
                f"{self.resends} / {self.resend_interval}"
            )
        if self.min_trigger_size < 0:
            raise ConfigError(
                f"roaming.min_trigger_size: must be >= 0, got {self.min_trigger_size}"
            )


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``payload`` (a PATH_CHALLENGE), sealed, to ``address``."""

    address: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class Switch:
    """``address`` is validated: send everything to the peer there from now on."""

    address: Address
    previous: Address | None


@dataclass(frozen=True, slots=True)
class Failed:
    """The validation of ``address`` timed out: rebuild the path (rendezvous/ICE)."""

    address: Address


@dataclass(frozen=True, slots=True)
class _Pending:
    address: Address
    nonce: bytes
    deadline: float
    resend_at: float
    resends_left: int


@dataclass(frozen=True, slots=True)
class RoamingCounters:
    """What one peer's validator did since it was created."""

    challenges: int = 0
    switches: int = 0
    failures: int = 0
    rate_limited: int = 0
    too_small: int = 0
    #: Responses that matched no pending validation (wrong nonce or source,
    #: late, or answers to the transport's silence probes).
    unmatched_responses: int = 0


def challenge_payload(nonce: bytes) -> bytes:
    """The PATH_CHALLENGE payload for ``nonce``."""
    return bytes((PATH_CHALLENGE,)) + nonce


def response_to(payload: bytes) -> bytes | None:
    """The PATH_RESPONSE that answers ``payload`` if it is a PATH_CHALLENGE,
    else ``None``. Same size as the challenge: answering never amplifies."""
    if len(payload) == CHALLENGE_SIZE and payload[0] == PATH_CHALLENGE:
        return bytes((PATH_RESPONSE,)) + payload[1:]
    return None


def is_path_payload(payload: bytes) -> bool:
    """Whether an authenticated payload is a path challenge or response
    (rather than a reliable-link frame)."""
    return len(payload) == CHALLENGE_SIZE and payload[0] in (PATH_CHALLENGE, PATH_RESPONSE)


def fresh_note(sent_ms: object, last_ms: int | None, now_ms: int, window_ms: int) -> bool:
    """Whether a sealed ``moved`` note the peer sent at ``sent_ms`` (its wall
    clock, milliseconds) may be acted on: within ``window_ms`` of ``now_ms``
    and strictly later than ``last_ms``, the last note of that peer acted on.
    The seal stops forgery, not replay (the rendezvous may replay what it
    relays), and every note acted on sends link data to the hinted address
    until the validation ends: so each note counts once, and old ones never."""
    if not isinstance(sent_ms, int) or isinstance(sent_ms, bool):
        return False
    if abs(now_ms - sent_ms) > window_ms:
        return False
    return last_ms is None or sent_ms > last_ms


class PathValidator:
    """Path validation with one peer; see the module docstring.

    ``current``: the address datagrams go to now (``None``: not known yet; the
    first authentic source is then adopted without a challenge, as the path
    that the handshake or ICE already proved). ``random_bytes`` must be a
    CSPRNG outside tests. Raises :class:`ConfigError` for a bad config."""

    def __init__(
        self,
        current: Address | None,
        config: RoamingConfig | None = None,
        *,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.config = config or RoamingConfig()
        self.config.validate()
        self.current = current
        self._random = random_bytes
        self._pending: _Pending | None = None
        self._tokens = float(self.config.burst)
        self._refilled: float | None = None
        self._c = RoamingCounters()

    @property
    def pending(self) -> Address | None:
        """The address being validated, if any."""
        return None if self._pending is None else self._pending.address

    @property
    def counters(self) -> RoamingCounters:
        return self._c

    def reset(self, current: Address | None) -> None:
        """A new path was built below (ICE): forget any pending validation and
        take ``current`` as the validated address."""
        self.current = current
        self._pending = None

    def adopt(self, current: Address) -> None:
        """The path below moved to ``current`` by itself (ICE nominated another
        pair; its checks are authenticated): take it as validated, and drop a
        pending validation of that same address (nothing left to prove)."""
        self.current = current
        if self._pending is not None and self._pending.address == current:
            self._pending = None

    def on_authentic(self, source: Address, size: int, now: float) -> Challenge | None:
        """An authentic, fresh DATA datagram of ``size`` sealed bytes arrived
        from ``source``. Returns the challenge to send, if one is due."""
        if self.current is None:
            self.current = source
            return None
        if source == self.current:
            return None
        if self._pending is not None and self._pending.address == source:
            return None  # already challenged; its timeout decides
        if size < self.config.min_trigger_size:
            self._count(too_small=1)
            return None
        if not self._take_token(now):
            self._count(rate_limited=1)
            return None
        return self._challenge(source, now)

    def _challenge(self, address: Address, now: float) -> Challenge:
        nonce = self._random(NONCE_SIZE)
        if len(nonce) != NONCE_SIZE:
            raise ConfigError(f"random_bytes: returned {len(nonce)} bytes, wanted {NONCE_SIZE}")
        cfg = self.config
        self._pending = _Pending(
            address, bytes(nonce), now + cfg.timeout, now + cfg.resend_interval, cfg.resends
        )
        self._count(challenges=1)
        return Challenge(address, challenge_payload(nonce))

    def hint(self, address: Address, now: float) -> Challenge | None:
        """Word from elsewhere (the rendezvous, sealed by the peer) that the
        peer is now at ``address``. Returns the challenge to send there, rate
        limit permitting; the path moves only on a valid response, as for
        :meth:`on_authentic`."""
        if address == self.current or (
            self._pending is not None and self._pending.address == address
        ):
            return None
        if not self._take_token(now):
            self._count(rate_limited=1)
            return None
        return self._challenge(address, now)

    def on_response(self, source: Address, payload: bytes, now: float) -> Switch | None:
        """An authentic PATH_RESPONSE ``payload`` arrived from ``source``.
        Returns :class:`Switch` if it completes the pending validation."""
        p = self._pending
        if (
            p is None
            or len(payload) != CHALLENGE_SIZE
            or payload[0] != PATH_RESPONSE
            or payload[1:] != p.nonce
            or source != p.address
            or now >= p.deadline
        ):
            self._count(unmatched_responses=1)
            return None
        if p.address == self.current:  # adopted meanwhile: validated, nothing moves
            self._pending = None
            return None
        previous, self.current, self._pending = self.current, p.address, None
        self._count(switches=1)
        return Switch(p.address, previous)

    def poll(self, now: float) -> Failed | Challenge | None:
        """:class:`Failed` once the pending validation's deadline passed; a
        :class:`Challenge` to send again (the same nonce) when a resend is due."""
        p = self._pending
        if p is None:
            return None
        if now >= p.deadline:
            self._pending = None
            self._count(failures=1)
            return Failed(p.address)
        if p.resends_left > 0 and now >= p.resend_at:
            self._pending = _Pending(
                p.address, p.nonce, p.deadline, now + self.config.resend_interval,
                p.resends_left - 1,
            )  # fmt: skip
            return Challenge(p.address, challenge_payload(p.nonce))
        return None

    def next_timeout(self) -> float | None:
        """When :meth:`poll` next has something to do, if ever."""
        p = self._pending
        if p is None:
            return None
        return min(p.deadline, p.resend_at) if p.resends_left > 0 else p.deadline

    def _take_token(self, now: float) -> bool:
        cfg = self.config
        if self._refilled is not None and now > self._refilled:
            self._tokens = min(
                float(cfg.burst), self._tokens + (now - self._refilled) * cfg.challenges_per_s
            )
        if self._refilled is None or now > self._refilled:
            self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _count(self, **delta: int) -> None:
        c = self._c
        self._c = RoamingCounters(
            *(getattr(c, f) + delta.get(f, 0) for f in RoamingCounters.__dataclass_fields__)
        )


__all__ = [
    "CHALLENGE_SIZE",
    "NONCE_SIZE",
    "PATH_CHALLENGE",
    "PATH_RESPONSE",
    "Challenge",
    "Failed",
    "PathValidator",
    "RoamingConfig",
    "RoamingCounters",
    "Switch",
    "challenge_payload",
    "fresh_note",
    "is_path_payload",
    "response_to",
]
