"""Shared fixtures: real node processes on loopback, always cleaned up."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.local import LocalCluster
from raftstate.config import NodeConfig


@pytest.fixture
def make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., LocalCluster]]:
    """Factory for started clusters with fast test timers; every cluster it
    made is stopped at teardown, and its logs are printed if the test failed."""
    made: list[LocalCluster] = []

    def factory(size: int = 3, start: bool = True, **overrides: Any) -> LocalCluster:
        base = dataclasses.replace(NodeConfig.for_tests(), **overrides)
        cluster = LocalCluster(tmp_path / f"cluster{len(made)}", size, base_config=base)
        made.append(cluster)
        if start:
            cluster.start(timeout_s=60)
        return cluster

    yield factory
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for cluster in made:
        cluster.stop()
        if failed:
            for node_id, text in cluster.logs():
                print(f"----- log of {node_id} (last 3000 chars) -----\n{text[-3000:]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, "rep_" + rep.when, rep)
