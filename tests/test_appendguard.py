"""appendguard.trim: a follower never deletes entries that match the leader's."""

from __future__ import annotations

from typing import Any

from raftstate import appendguard


def trim(message: dict[str, Any], ours: list[Any]) -> dict[str, Any]:
    """The rewritten message; the reply cap must be None (nothing unclaimed)."""
    out, cap = appendguard.trim(message, ours)
    assert cap is None
    return out


def log(*terms: int, start: int = 10) -> list[tuple[bytes, int, int]]:
    """Entries (command, index, term) from index ``start``."""
    return [(b"", start + i, t) for i, t in enumerate(terms)]


def ae(prev: int, prev_term: int, entries: list[Any], term: int = 5) -> dict[str, Any]:
    return {"type": "append_entries", "term": term, "commit_index": 0,
            "prevLogIdx": prev, "prevLogTerm": prev_term, "entries": entries}  # fmt: skip


def test_resent_prefix_of_entries_we_hold_deletes_nothing() -> None:
    """The hole: we hold 10..15 (term 5); the leader resends 11..12 only.
    pysyncobj would delete 13..15; the trim moves prev to our end instead."""
    ours = log(4, 5, 5, 5, 5, 5)  # 10..15
    out = trim(ae(10, 4, log(5, 5, start=11)), ours)
    assert out["prevLogIdx"] == 15 and out["prevLogTerm"] == 5 and out["entries"] == []


def test_new_entries_past_our_end_are_appended_without_deleting() -> None:
    ours = log(4, 5, 5)  # 10..12
    out = trim(ae(10, 4, log(5, 5, 5, 5, start=11)), ours)
    assert out["prevLogIdx"] == 12 and out["entries"] == log(5, 5, start=13)


def test_a_conflict_truncates_exactly_from_the_conflict() -> None:
    ours = log(4, 5, 3, 3)  # 10..13; 12 and 13 from an old term
    out = trim(ae(10, 4, log(5, 5, 5, start=11)), ours)
    assert out["prevLogIdx"] == 11 and out["prevLogTerm"] == 5
    assert out["entries"] == log(5, 5, start=12)


def test_conflict_at_the_first_entry_passes_unchanged() -> None:
    ours = log(4, 3, 3)
    msg = ae(10, 4, log(5, 5, start=11))
    assert trim(msg, ours) is msg


def test_older_term_extras_past_the_range_are_kept_but_not_claimed() -> None:
    """12 is from term 3, beyond the message's range: it may be committed and
    applied, so it is not deleted; but the reply must not claim it."""
    ours = log(4, 5, 3)
    msg = {**ae(10, 4, log(5, start=11)), "commit_index": 12}
    out, cap = appendguard.trim(msg, ours)
    assert out["prevLogIdx"] == 12 and out["entries"] == []  # nothing deleted
    assert cap == 11 and out["commit_index"] == 11


def test_heartbeat_below_applied_older_entries_deletes_nothing() -> None:
    """The flood case: a new leader's heartbeat starts at 37 (a nextIndex
    reset) while the follower holds 38..57 of the old term, all applied.
    pysyncobj deleted them (CRITICAL "truncating already-applied log
    entries"); now nothing is deleted and only 37 is confirmed."""
    ours = log(*([1] * 21), start=37)  # 37..57, term 1
    out, cap = appendguard.trim(ae(37, 1, [], term=2), ours)
    assert out["prevLogIdx"] == 57 and out["entries"] == []
    assert cap == 37 and out["commit_index"] == 0


def test_heartbeat_below_our_end_keeps_this_terms_entries() -> None:
    ours = log(4, 5, 5)
    out = trim(ae(10, 4, []), ours)
    assert out["prevLogIdx"] == 12 and out["prevLogTerm"] == 5


def test_messages_pysyncobj_rejects_or_transmissions_pass_unchanged() -> None:
    msg = ae(10, 9, log(5, start=11))  # prevLogTerm mismatch
    assert trim(msg, log(4, 5)) is msg
    assert trim(msg, []) is msg  # no entry at prevLogIdx
    chunk = {**ae(10, 4, []), "transmission": "start", "data": b""}
    assert trim(chunk, log(4, 5)) is chunk
    exact = ae(10, 4, log(5, start=11))
    assert trim(exact, log(4)) is exact  # nothing of ours past prev
