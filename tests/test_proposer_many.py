"""Proposer.submit_many, in process: a fake Raft that applies each proposed
entry to a real DeviceTable when the test says so (or fails it), so order,
retries, quotas, admission and cancellation are checked exactly."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftstate.config import NodeConfig
from raftstate.errors import (
    DeadlineExceeded,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    Unavailable,
)
from raftstate.model import Heartbeat, HeartbeatResult, validate_heartbeat
from raftstate.proposer import Proposer
from raftstate.raftnode import SUCCESS, ProposeCallback
from raftstate.statemachine import DeviceTable

FAILED = 1  # any pysyncobj failure reason


class FakeRaft:
    """Holds proposed entries until :meth:`commit` or :meth:`fail`."""

    def __init__(self) -> None:
        self.table = DeviceTable()
        self.entries: list[tuple[bytes, ProposeCallback]] = []
        self.proposed = 0

    def propose(self, entry: bytes, callback: ProposeCallback) -> None:
        self.proposed += 1
        self.entries.append((entry, callback))

    def commit(self, n: int | None = None) -> None:
        todo, self.entries = self.entries[:n], self.entries[len(self.entries[:n]) :]
        for entry, callback in todo:
            callback(self.table.apply(entry), SUCCESS)

    def fail(self) -> None:
        todo, self.entries = self.entries, []
        for _entry, callback in todo:
            callback(None, FAILED)


def hb(device_id: str, seq: int, **reported: str) -> Heartbeat:
    return validate_heartbeat(device_id, seq, reported, 0)


async def until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not cond():
        assert loop.time() < end, "condition not reached in time"
        await asyncio.sleep(0.001)


def make(raft: FakeRaft, **cfg: object) -> Proposer:
    config = NodeConfig.default(**cfg)
    return Proposer(config, raft.propose, asyncio.get_running_loop())


async def drive(raft: FakeRaft, proposer: Proposer, fut: asyncio.Future[object]) -> None:
    """Commit whatever is proposed until ``fut`` resolves."""
    while not fut.done():
        raft.commit()
        await asyncio.sleep(0.001)


def test_one_future_resolves_with_every_result_in_request_order() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft)
        hbs = [hb(f"d{i % 7}", 1 + i // 7, i=str(i)) for i in range(50)]
        group = p.submit_many(hbs)
        await drive(raft, p, group.future)  # type: ignore[arg-type]
        results = group.future.result()
        assert all(isinstance(r, HeartbeatResult) for r in results)
        assert [r.stored_seq for r in results] == [h.seq for h in hbs]  # type: ignore[union-attr]
        assert not any(r.duplicate for r in results)  # type: ignore[union-attr]
        assert p.room == p._max_pending  # nothing left waiting

    asyncio.run(main())


def test_same_seq_twice_in_one_group_is_applied_once_and_acked_as_duplicate() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft)
        group = p.submit_many([hb("dup", 5, v="a"), hb("dup", 5, v="b"), hb("dup", 3)])
        await drive(raft, p, group.future)  # type: ignore[arg-type]
        first, again, older = group.future.result()
        assert isinstance(first, HeartbeatResult) and not first.duplicate
        assert isinstance(again, HeartbeatResult) and again.duplicate and again.stored_seq == 5
        assert isinstance(older, HeartbeatResult) and older.duplicate and older.stored_seq == 5
        view = raft.table.get("dup")
        assert view is not None and view.heartbeats == 1 and dict(view.reported) == {"v": "a"}

    asyncio.run(main())


def test_a_failed_entry_is_retried_with_the_same_heartbeats_until_it_commits() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft)
        group = p.submit_many([hb("r1", 1), hb("r2", 1)])
        await until(lambda: bool(raft.entries))
        raft.fail()
        await until(lambda: bool(raft.entries))  # proposed again after RETRY_DELAY_S
        assert p.entries_retried == 1
        await drive(raft, p, group.future)  # type: ignore[arg-type]
        assert [r.stored_seq for r in group.future.result()] == [1, 1]  # type: ignore[union-attr]

    asyncio.run(main())


def test_quota_refusal_at_apply_is_that_items_error_and_the_rest_commit() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, max_devices=2)
        group = p.submit_many([hb("q1", 1), hb("q2", 1), hb("q3", 1), hb("q1", 2)])
        await drive(raft, p, group.future)  # type: ignore[arg-type]
        r = group.future.result()
        assert isinstance(r[2], QuotaExceeded) and r[2].quota == "max_devices"
        assert [x.stored_seq for x in (r[0], r[1], r[3])] == [1, 1, 2]  # type: ignore[union-attr]

    asyncio.run(main())


def test_more_than_room_is_refused_whole_and_queues_nothing() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, max_pending_heartbeats=10, batch_rpc_max_heartbeats=10)
        first = p.submit_many([hb(f"a{i}", 1) for i in range(6)])
        assert p.room == 4
        with pytest.raises(ResourceExhausted, match="^max_pending_heartbeats:"):
            p.submit_many([hb(f"b{i}", 1) for i in range(5)])
        assert p.room == 4
        second = p.submit_many([hb(f"b{i}", 1) for i in range(4)])
        assert p.room == 0
        with pytest.raises(ResourceExhausted):
            p.submit(hb("c", 1))
        await drive(raft, p, first.future)  # type: ignore[arg-type]
        await drive(raft, p, second.future)  # type: ignore[arg-type]
        assert p.room == 10

    asyncio.run(main())


def test_cancelling_a_group_frees_its_room_and_stops_proposing_it() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, max_pending_heartbeats=100, batch_max_heartbeats=5, max_inflight_batches=1)
        group = p.submit_many([hb(f"x{i}", 1) for i in range(30)])
        await until(lambda: bool(raft.entries))
        raft.commit(1)  # the first entry commits: those results are recorded
        await until(lambda: any(r is not None for r in group.results))
        settled = sum(r is not None for r in group.results)
        group.cancel()
        await until(lambda: p.room == 100)
        before = raft.proposed
        raft.fail()  # whatever was in flight fails: it must not be proposed again
        await asyncio.sleep(0.1)
        raft.commit()
        assert raft.proposed == before  # nothing of the cancelled group proposed again
        assert settled == 5 and sum(r is not None for r in group.results) == settled

    asyncio.run(main())


def test_unsettled_items_expire_with_deadline_exceeded() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, default_request_timeout_ms=50)  # retried for at most 100 ms
        group = p.submit_many([hb("e1", 1), hb("e2", 1)])
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while not group.future.done():
            assert loop.time() < end
            raft.fail()
            await asyncio.sleep(0.005)
        assert all(isinstance(r, DeadlineExceeded) for r in group.future.result())
        assert p.room == p._max_pending

    asyncio.run(main())


def test_close_fails_pending_items_with_unavailable_and_refuses_new_ones() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, max_inflight_batches=1, batch_max_heartbeats=2)
        first = p.submit_many([hb("c1", 1), hb("c2", 1)])  # proposed at once
        second = p.submit_many([hb("c3", 1)])  # waits for the slot
        p.close()
        assert second.future.done()
        assert isinstance(second.future.result()[0], Unavailable)
        with pytest.raises(Unavailable):
            p.submit_many([hb("c4", 1)])
        raft.commit()
        await until(first.future.done)

    asyncio.run(main())


def test_an_empty_group_is_already_resolved() -> None:
    async def main() -> None:
        p = make(FakeRaft())
        group = p.submit_many([])
        assert group.future.done() and group.future.result() == []

    asyncio.run(main())


def test_a_group_and_single_submits_share_entries_and_keep_order() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, max_inflight_batches=1)
        blocker = p.submit(hb("o", 1))  # in flight: the next ones accumulate
        group = p.submit_many([hb("o", 2), hb("o", 3)])
        single = p.submit(hb("o", 4))
        await drive(raft, p, single)  # type: ignore[arg-type]
        await drive(raft, p, group.future)  # type: ignore[arg-type]
        assert blocker.result().stored_seq == 1
        assert [r.stored_seq for r in group.future.result()] == [2, 3]  # type: ignore[union-attr]
        assert single.result().stored_seq == 4
        assert raft.proposed == 2  # 2, 3 and 4 went out together

    asyncio.run(main())


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 8 * 1024 - 2), min_size=1, max_size=1000),
    max_items=st.integers(1, 512),
)
def test_any_group_size_and_payload_settles_every_item_in_bounded_entries(
    sizes: list[int], max_items: int
) -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft, batch_max_heartbeats=max_items)
        hbs = [hb(f"s{i}", 1, k="x" * n) for i, n in enumerate(sizes)]
        group = p.submit_many(hbs)
        while not group.future.done():
            for entry, _cb in raft.entries:
                assert len(entry) <= NodeConfig().batch_max_bytes
            raft.commit()
            await asyncio.sleep(0)
        results = group.future.result()
        assert len(results) == len(hbs)
        assert all(isinstance(r, HeartbeatResult) and r.stored_seq == 1 for r in results)
        assert len(raft.table) == len(hbs)

    asyncio.run(main())


def test_outcome_type_is_a_result_or_a_raftstate_error() -> None:
    # The contract the server relies on when it turns outcomes into acks.
    from raftstate.proposer import Outcome

    assert set(Outcome.__args__) == {HeartbeatResult, RaftStateError}  # type: ignore[attr-defined]
