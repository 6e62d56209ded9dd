"""The large-payload flood, end to end: the CI-sized run of the [integrity]
scenario (``chaos/floodrun.py``; ``raftstate chaos flood`` runs the full
20,000 devices): pipelined streams of new devices with reported maps up to
the 8 KiB limit into the leader and a follower at once, a kill -9 of the
leader in the middle, then a restart of every node.

Checked: every acknowledged heartbeat is on every node, no node logged a
tick failure or a truncation of applied entries, and the cluster commits a
new heartbeat within 2 s of the load stopping.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.floodrun import run_flood

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_flood_of_8kib_heartbeats_with_leader_kill_and_full_restart_loses_nothing(
    tmp_path: Path, transport: str
) -> None:
    report = run_flood(tmp_path, devices=1_200, transport=transport)
    assert report.errors == 0, report.error_samples
    assert report.acked >= 1_150
    assert report.megabytes_acked > 5  # the payloads really were large
    assert report.commit_after_load_s < 2.0, "no commit within 2 s of the load stopping"
    assert not any(report.missing_after_restart.values()), report.missing_after_restart
    assert not report.bad_log_lines, report.bad_log_lines
