"""Weak-network profiles: ``chaos/profiles.toml`` as typed, validated values.

A :class:`Profile` has two toxic sets, ``device`` (TCP proxies in front of
each node's gRPC port) and ``node`` (UDP proxies, one per directed node pair,
carrying the Raft transport), plus an optional outage ``schedule``. Toxic
types and attribute names are the proxy's own (:mod:`chaos.proxy.toxics`);
latencies are one-way. The file's header comment is the reference.

:func:`load_profiles` raises :class:`ProfileError` naming the profile, the
section and the rule it broke; nothing here touches the network.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos.proxy.toxics import TCP_TOXIC_ATTRIBUTES, UDP_TOXIC_ATTRIBUTES

__all__ = [
    "DEFAULT_PROFILES",
    "Outage",
    "Profile",
    "ProfileError",
    "ToxicSetting",
    "load_profile",
    "load_profiles",
]

DEFAULT_PROFILES = Path(__file__).with_name("profiles.toml")
#: Attributes that are probabilities (fractions 0..1), whatever the toxic.
_FRACTIONS = frozenset({"loss_rate", "correlation", "probability"})
_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_SELECTORS = ("leader", "follower")


class ProfileError(ValueError):
    """A profile file that breaks a rule; the message names where."""


@dataclass(frozen=True, slots=True)
class ToxicSetting:
    """One toxic type with its attributes (missing attributes are 0)."""

    type: str
    attributes: tuple[tuple[str, float], ...]

    def attribute_map(self) -> dict[str, float]:
        return dict(self.attributes)


@dataclass(frozen=True, slots=True)
class Outage:
    """Isolate one node at the node links from ``at_s`` for ``duration_s``.
    ``isolate``: a node id, ``"leader"`` or ``"follower"``."""

    at_s: float
    duration_s: float
    isolate: str


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    device: tuple[ToxicSetting, ...]
    node: tuple[ToxicSetting, ...]
    schedule: tuple[Outage, ...] = ()

    @property
    def node_rtt_ms(self) -> float:
        """The round-trip latency the node links add (2 × one-way)."""
        return 2 * sum(t.attribute_map().get("latency", 0.0) for t in self.node)


def load_profiles(path: str | Path = DEFAULT_PROFILES) -> dict[str, Profile]:
    """Every profile in ``path``, by name. Raises ``ProfileError``."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile file {path} is not valid TOML: {exc}") from None
    return {name: _profile(name, body) for name, body in raw.items()}


def load_profile(name: str, path: str | Path = DEFAULT_PROFILES) -> Profile:
    """One profile by name. Raises ``ProfileError`` (also for an unknown name)."""
    profiles = load_profiles(path)
    if name not in profiles:
        raise ProfileError(f"{name}: no such profile; known: {', '.join(sorted(profiles))}")
    return profiles[name]


def _profile(name: str, body: Any) -> Profile:
    if not isinstance(body, dict):
        raise ProfileError(f"{name}: must be a table")
    unknown = set(body) - {"description", "device", "node", "schedule"}
    if unknown:
        raise ProfileError(f"{name}.{sorted(unknown)[0]}: unknown key")
    for section in ("device", "node"):
        if section not in body:
            raise ProfileError(f"{name}.{section}: required (may be empty)")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise ProfileError(f"{name}.description: must be a string")
    device = _toxics(f"{name}.device", body["device"], TCP_TOXIC_ATTRIBUTES, tcp=True)
    node = _toxics(f"{name}.node", body["node"], UDP_TOXIC_ATTRIBUTES, tcp=False)
    schedule = _schedule(f"{name}.schedule", body.get("schedule", []))
    return Profile(name, description, device, node, schedule)


def _toxics(
    where: str, section: Any, allowed: Mapping[str, tuple[str, ...]], *, tcp: bool
) -> tuple[ToxicSetting, ...]:
    if not isinstance(section, dict):
        raise ProfileError(f"{where}: must be a table of toxics")
    out = []
    for kind, attrs in section.items():
        if kind not in allowed:
            hint = (
                " (a TCP proxy cannot drop, duplicate or reorder packets; "
                "put it in the node section)"
                if tcp and kind in UDP_TOXIC_ATTRIBUTES
                else ""
            )
            raise ProfileError(f"{where}.{kind}: unknown toxic; one of {', '.join(allowed)}{hint}")
        if not isinstance(attrs, dict):
            raise ProfileError(f"{where}.{kind}: must be a table of attributes")
        values = []
        for attr, value in attrs.items():
            if attr not in allowed[kind]:
                raise ProfileError(
                    f"{where}.{kind}.{attr}: unknown attribute; one of {', '.join(allowed[kind])}"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ProfileError(f"{where}.{kind}.{attr}: must be a non-negative number")
            if attr in _FRACTIONS and value > 1:
                raise ProfileError(f"{where}.{kind}.{attr}: is a fraction 0..1, got {value}")
            values.append((attr, float(value)))
        out.append(ToxicSetting(kind, tuple(values)))
    return tuple(out)


def _schedule(where: str, items: Any) -> tuple[Outage, ...]:
    if not isinstance(items, list):
        raise ProfileError(f"{where}: must be an array of tables ([[{where}]])")
    out = []
    for i, item in enumerate(items):
        here = f"{where}[{i}]"
        if not isinstance(item, dict) or set(item) != {"at_s", "duration_s", "isolate"}:
            raise ProfileError(f"{here}: needs exactly at_s, duration_s and isolate")
        at_s, duration_s, isolate = item["at_s"], item["duration_s"], item["isolate"]
        for key, value in (("at_s", at_s), ("duration_s", duration_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ProfileError(f"{here}.{key}: must be a non-negative number of seconds")
        if duration_s == 0:
            raise ProfileError(f"{here}.duration_s: must be positive")
        if not isinstance(isolate, str) or not (
            isolate in _SELECTORS or _NODE_ID.fullmatch(isolate)
        ):
            raise ProfileError(f'{here}.isolate: a node id, "leader" or "follower"')
        out.append(Outage(float(at_s), float(duration_s), isolate))
    ordered = tuple(sorted(out, key=lambda o: o.at_s))
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.at_s < before.at_s + before.duration_s:
            raise ProfileError(f"{where}: outage at {after.at_s}s starts before the previous ends")
    return ordered
