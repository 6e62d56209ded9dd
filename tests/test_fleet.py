"""The CI-sized fleet: 50,000 devices through gateways while the log compacts.

The [million] scenario (``raftstate bench --fleet``) scaled to CI: a
three-node cluster whose compaction is set small (1.5 MiB of journal), so
that loading 50,000 devices and then holding a heartbeat rate compacts every
node several times under load. Checked:

* no election and no leader change from the start of the load to the end of
  the hold (Status terms, polled throughout);
* every node compacted at least twice (its snapshot.bin replaced);
* every acknowledged heartbeat is on every node and all nodes agree
  (the shared verifier, chaos/verify.py);
* the longest Raft tick per node is reported (target: 50 ms).

The gateways use ``HeartbeatBatch``; ``RAFTSTATE_FLEET_PATH=stream`` (or a
server without the batch RPC, with the default ``auto``) uses
``HeartbeatStream`` instead.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from bench.fleet import raftstate_fleet, run_load_phase
from bench.fleetwatch import between
from bench.run import add_bench_arguments
from chaos.verify import verify

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

DEVICES = 50_000


def fleet_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return p.parse_args(["--fleet", "--security", "insecure", *argv])


def test_fleet_of_50k_devices_compacts_under_load_without_election_and_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = os.environ.get("RAFTSTATE_FLEET_PATH", "auto")
    args = fleet_args(
        "--fleet-devices", str(DEVICES),
        "--fleet-rate", "2000",
        "--fleet-duration", "6",
        "--fleet-warmup", "1",
        "--fleet-gateways", "8",
        "--fleet-in-flight", "2",
        "--fleet-path", path,
        "--procs", "2",
    )  # fmt: skip
    # About 70 B of journal per heartbeat: 1.5 MiB compacts each node every
    # ~22,000 heartbeats, three to four times in this run.
    config = {"compaction_max_journal_bytes": 3 << 19, "compaction_min_entries": 100_000}
    with raftstate_fleet(args, tmp_path, **config) as sut:
        start = sut.watch.checkpoint()
        load_row, load = run_load_phase(sut, "load", args, collect_acked=True)
        assert not load_row.failed, load_row
        hold_row, hold = run_load_phase(sut, "hold", args, collect_acked=True)
        assert not hold_row.failed, hold_row
        end = sut.watch.checkpoint()
        acked = dict(load.acked_seq)
        for device, seq in hold.acked_seq.items():
            acked[device] = max(acked.get(device, 0), seq)
        verdict = verify(sut.endpoints, acked, None, timeout_s=60)
        run = between(start, end)
        with capsys.disabled():
            print(
                f"\nfleet test ({sut.path}): load {load_row.acked_per_s:.0f}/s, hold "
                f"{hold_row.acked_per_s:.0f}/s p99 {hold_row.latency_ms.get('p99')} ms; "
                f"compactions {run.compactions}; longest tick ms {run.max_tick_ms}; "
                f"ticks > 50 ms {run.tick_stalls}"
            )
    assert load_row.errors == 0 and hold_row.errors == 0, (
        load_row.error_samples,
        hold_row.error_samples,
    )
    assert len(load.acked_seq) == DEVICES
    assert hold_row.acked > 0
    assert run.term_changes == 0, f"{run.term_changes} election(s) during the fleet load"
    assert run.leader_changes == 0
    assert min(run.compactions.values()) >= 2, run.compactions
    assert verdict.ok, verdict.explain()
    assert verdict.devices == DEVICES
