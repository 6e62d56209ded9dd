"""PreVote on a real cluster: a follower cut off for several election
timeouts rejoins without deposing the leader (raftstate/prevote.py).

The follower is isolated by disabling the chaos proxies on every link that
touches it (chaos/harness.py: per-link UDP proxies; chaos/tcpcluster.py: one
TCP proxy per node pair), under a light write load. Run with
``RAFTSTATE_PRE_VOTE=false`` in the environment (the node processes inherit
it) and the disruption assertions fail: that is the negative control.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from chaos.harness import ChaosCluster
from chaos.tcpcluster import new_cluster
from cluster.local import LocalCluster, wait_until
from raftstate.config import NodeConfig
from raftstate.errors import RaftStateError
from raftstate.sdk import DeviceClient

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

CFG = NodeConfig.for_tests()
ELECTION_MAX_S = CFG.election_timeout_max_ms / 1000
#: How long the follower stays cut off: several election timeouts.
ISOLATION_S = 5 * ELECTION_MAX_S
#: After it caught up, how long we keep watching for a late disruption.
WATCH_S = 3 * ELECTION_MAX_S
HEALS = 3


class LightLoad:
    """One thread writing a heartbeat every ~20 ms to any node that takes it."""

    def __init__(self, endpoints: list[str]) -> None:
        self.acked = 0
        self._stop = threading.Event()
        self._client = DeviceClient(endpoints, deadline_s=2.0)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LightLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._client.close()

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(0.02):
            i += 1
            try:
                self._client.heartbeat(f"pv-{i % 8}", {"i": str(i)})
                self.acked += 1
            except RaftStateError:
                pass


@dataclass(frozen=True)
class Heal:
    leader_before: str
    leader_after: str
    term_before: int
    term_after: int
    follower_term_at_heal: int
    catch_up_s: float


@pytest.fixture(params=["udp", "tcp"])
def chaos(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ChaosCluster]:
    cc = new_cluster(tmp_path, request.param, base_config=CFG)
    with cc:
        yield cc


def term_of_node(cluster: LocalCluster, node_id: str) -> int:
    st = cluster.status(node_id)
    assert st is not None, f"{node_id} does not answer Status"
    return int(st.term)


def isolate_and_heal(cc: ChaosCluster, load: LightLoad) -> Heal:
    """Cut one follower off for ISOLATION_S, heal, wait until it caught up,
    then watch for WATCH_S."""
    leader = cc.nodes.wait_for_leader(30)
    follower = next(n for n in cc.nodes.nodes if n != leader)
    term = term_of_node(cc.nodes, leader)
    cc.isolate(follower)
    before = load.acked
    deadline = time.monotonic() + ISOLATION_S
    wait_until(lambda: time.monotonic() >= deadline, ISOLATION_S + 5, "the isolation to last")
    assert load.acked > before, "the majority kept taking writes"
    follower_term = term_of_node(cc.nodes, follower)
    cc.heal()
    healed = time.monotonic()
    leader_st = cc.nodes.status(leader)
    target = leader_st.commit_index if leader_st is not None else 0
    cc.nodes.wait_applied(follower, target, 30)
    catch_up = time.monotonic() - healed
    watch_end = time.monotonic() + WATCH_S
    wait_until(lambda: time.monotonic() >= watch_end, WATCH_S + 5, "the watch window")
    after = cc.nodes.wait_for_leader(30)
    return Heal(leader, after, term, term_of_node(cc.nodes, after), follower_term, catch_up)


def test_a_healed_follower_neither_changes_the_term_nor_the_leader(chaos: ChaosCluster) -> None:
    heals: list[Heal] = []
    with LightLoad(chaos.node_endpoints) as load:
        for _ in range(HEALS):
            heals.append(isolate_and_heal(chaos, load))
    print("\n".join(str(h) for h in heals))
    for node_id, text in chaos.nodes.logs():
        print("\n".join(f"{node_id} {line}" for line in text.splitlines() if "pre-vote" in line))
    for h in heals:
        assert h.follower_term_at_heal == h.term_before, f"isolated follower raised its term: {h}"
        assert h.term_after == h.term_before, f"the heal changed the term: {h}"
        assert h.leader_after == h.leader_before, f"the heal changed the leader: {h}"


def test_a_single_node_is_its_own_pre_vote_majority(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster(size=1)
    leader = cluster.wait_for_leader(30)
    with DeviceClient(cluster.endpoints) as client:
        assert client.heartbeat("solo", {"up": "1"}).seq > 0
    assert term_of_node(cluster, leader) == 1  # one election, no pre-vote retries
