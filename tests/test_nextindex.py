"""ResetGuard: which next_node_idx resets a pysyncobj leader applies."""

from __future__ import annotations

import pytest

from raftstate.nextindex import ResetGuard, SendLedger


def test_first_reset_is_honoured_and_raised_to_above_match() -> None:
    g = ResetGuard()
    assert g.on_reset("n2", term=5, match_index=0, hint=512, now=0.0) == 512
    g2 = ResetGuard()
    assert g2.on_reset("n2", term=5, match_index=300, hint=100, now=0.0) == 301


def test_walk_back_progresses_and_stale_higher_resets_are_ignored() -> None:
    """The livelock: while the leader steps back from 512, rejections of
    AppendEntries sent earlier keep saying 512; only lower hints count."""
    g = ResetGuard()
    assert g.on_reset("n2", 7, 0, 512, now=0.0) == 512
    assert g.on_reset("n2", 7, 0, 511, now=0.01) == 511  # step back
    assert g.on_reset("n2", 7, 0, 512, now=0.02) is None  # stale "my last + 1"
    assert g.on_reset("n2", 7, 0, 512, now=0.03) is None
    assert g.on_reset("n2", 7, 0, 510, now=0.04) == 510
    assert g.on_reset("n2", 7, 0, 510, now=0.05) == 510  # equal: resend allowed


def test_a_lost_reply_cannot_wedge_the_peer() -> None:
    g = ResetGuard(resend_after_s=1.0)
    assert g.on_reset("n2", 7, 0, 510, now=0.0) == 510
    assert g.on_reset("n2", 7, 0, 600, now=0.5) is None
    assert g.on_reset("n2", 7, 0, 600, now=1.0) == 600


def test_progress_and_new_terms_and_peers_start_afresh() -> None:
    g = ResetGuard()
    assert g.on_reset("n2", 7, 0, 510, now=0.0) == 510
    assert g.on_reset("n3", 7, 0, 700, now=0.0) == 700  # peers are independent
    assert g.on_reset("n2", 8, 0, 900, now=0.1) == 900  # a new term
    g.on_progress("n2")
    assert g.on_reset("n2", 8, 0, 950, now=0.2) == 950


def test_resend_after_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ResetGuard(0)


def test_send_ledger_counts_entries_sent_again_per_peer_and_term() -> None:
    led = SendLedger()
    led.on_append("n2", 3, 1, 10)
    led.on_append("n2", 3, 11, 12)
    assert led.counts(3) == {"n2": (12, 0)}
    led.on_append("n2", 3, 8, 14)  # 8..12 again, 13..14 new
    led.on_append("n3", 3, 1, 4)
    assert led.counts(3) == {"n2": (19, 5), "n3": (4, 0)}
    led.on_append("n2", 3, 5, 4)  # empty range (heartbeat): nothing
    assert led.counts(3)["n2"] == (19, 5)


def test_send_ledger_starts_over_in_a_new_term() -> None:
    led = SendLedger()
    led.on_append("n2", 3, 1, 10)
    led.on_append("n2", 4, 5, 10)  # new leader term: not a resend
    assert led.counts(4) == {"n2": (6, 0)}
    assert led.counts(3) == {}
