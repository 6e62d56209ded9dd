"""bench.linksim with reported states: every heartbeat still commits, and the
state's bytes reach the wire (the model carries them, not only a tag)."""

from __future__ import annotations

from bench.linksim import run, state_size, table


def test_heartbeats_with_states_up_to_8_kib_commit_and_cost_their_bytes() -> None:
    tiny = run("weak", 300, 150.0, seed=1)
    big = run("weak", 300, 150.0, seed=1, state_bytes=8000)
    assert tiny["committed"] == big["committed"] == 300
    mean_state = sum(state_size(i, 8000) for i in range(300)) / 300
    # Each heartbeat's state crosses at least twice (AppendEntries to two
    # followers); forwards add more for two thirds of them.
    assert big["wire_bytes_per_hb"] - tiny["wire_bytes_per_hb"] >= 2 * mean_state
    assert big["p50_ms"] >= tiny["p50_ms"] - 1.0
    lines = table([tiny, big]).splitlines()
    assert len(lines) == 3 and lines[1].split()[:2] == ["0", "weak"]
    assert lines[2].split()[:2] == ["8000", "weak"]


def test_state_sizes_are_the_lab_benchs_draw() -> None:
    from chaos.labbench import state_of

    for i in range(200):
        assert len(state_of(i, 2048).get("p", "")) == state_size(i, 2048)
    assert state_size(5, 0) == 0
