"""appendguard.trim: a follower never deletes entries that match the leader's."""

from __future__ import annotations

from typing import Any

from raftstate.appendguard import trim


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


def test_older_term_extras_past_the_range_are_the_only_ones_dropped() -> None:
    ours = log(4, 5, 3)  # 12 is from term 3, beyond the message's range
    out = trim(ae(10, 4, log(5, start=11)), ours)
    assert out["prevLogIdx"] == 11 and out["entries"] == []


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
