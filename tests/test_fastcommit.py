"""Follower-side commit in three-voter clusters (raftstate/fastcommit.py)."""

from __future__ import annotations

from typing import Any

from raftstate.fastcommit import enabled, raise_commit, read_floor


def _ae(
    term: int, prev: tuple[int, int], entries: list[tuple[int, int]], commit: int
) -> dict[str, Any]:
    return {
        "type": "append_entries",
        "term": term,
        "commit_index": commit,
        "prevLogIdx": prev[0],
        "prevLogTerm": prev[1],
        "entries": [(b"x", idx, t) for idx, t in entries],
    }


def test_only_three_voters() -> None:
    assert enabled(3)
    assert not enabled(5) and not enabled(1) and not enabled(2) and not enabled(4)


def test_last_entry_of_the_leaders_term_is_committed_with_everything_before() -> None:
    msg = _ae(7, (10, 6), [(11, 6), (12, 7), (13, 7)], commit=9)
    assert raise_commit(msg)["commit_index"] == 13


def test_a_message_ending_in_an_older_term_raises_nothing() -> None:
    # The new leader re-replicating the old leader's entries: not its own yet.
    msg = _ae(7, (10, 6), [(11, 6), (12, 6)], commit=9)
    assert raise_commit(msg) is msg


def test_heartbeat_commits_up_to_prev_when_prev_is_of_the_leaders_term() -> None:
    assert raise_commit(_ae(7, (20, 7), [], commit=15))["commit_index"] == 20
    older = _ae(7, (20, 6), [], commit=15)
    assert raise_commit(older) is older


def test_never_lowers_the_leaders_commit_index_and_skips_snapshots() -> None:
    msg = _ae(7, (10, 7), [(11, 7)], commit=30)
    assert raise_commit(msg) is msg
    snap = {"type": "append_entries", "term": 7, "commit_index": 0, "serialized": b""}
    assert raise_commit(snap) is snap
    chunk = {**_ae(7, (10, 7), [], commit=0), "transmission": "start", "data": b""}
    assert raise_commit(chunk) is chunk


def test_reads_wait_for_the_leaders_last_entry_when_followers_commit() -> None:
    # A follower may have acked entry 12 before the leader counted it (commit 10).
    assert read_floor(True, commit_index=10, last_log_index=12) == 12
    assert read_floor(False, commit_index=10, last_log_index=12) == 10
