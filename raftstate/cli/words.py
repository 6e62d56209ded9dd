"""Counted nouns for what the command line prints: ``1 device``, ``2 devices``."""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and ``noun``, the noun in the plural unless ``n == 1``
    (``many`` for irregular plurals). Thousands are comma-grouped."""
    return f"{n:,} {noun if n == 1 else (many or noun + 's')}"


__all__ = ["plural"]
