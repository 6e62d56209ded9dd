"""The stall probe's inputs: the proposer's in-flight bookkeeping (an entry
whose callback never comes stays visible with its age) and the stall rule."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from raftstate.stallprobe import STALL_AGE_S, STALL_LAG_S, Arrivals, Sample, stalled
from tests.test_proposer_many import FakeRaft, hb, make, until


def test_an_entry_without_callback_stays_in_flight_and_answered_ones_leave() -> None:
    async def main() -> None:
        raft = FakeRaft()
        p = make(raft)
        futs = [p.submit(hb(f"d{i}", 1)) for i in range(3)]
        await until(lambda: raft.proposed >= 1)
        assert len(p.inflight_since) == raft.proposed
        raft.commit(1)  # the first entry answers; the rest never do
        await until(lambda: p.entries_answered == 1)
        assert p.submitted == 3
        assert len(p.inflight_since) == raft.proposed - 1
        assert min(p.inflight_since) == 2  # proposal numbers: the first left
        failing = len(raft.entries)
        raft.fail()
        await until(lambda: p.entries_failed == failing)

        def settled() -> bool:
            raft.commit()  # the retried heartbeats, as they are proposed again
            return all(f.done() for f in futs)

        await until(settled)
        await until(lambda: not p.inflight_since and not raft.entries)
        assert p.entries_answered == p.entries_proposed

    asyncio.run(main())


@given(
    lag=st.floats(0, 10, allow_nan=False),
    inflight=st.floats(0, 10, allow_nan=False),
    pending=st.floats(0, 10, allow_nan=False),
)
def test_a_sample_is_a_stall_exactly_when_one_bound_is_crossed(
    lag: float, inflight: float, pending: float
) -> None:
    crossed = lag > STALL_LAG_S or inflight > STALL_AGE_S or pending > STALL_AGE_S
    assert stalled(Sample(lag, inflight, pending)) == crossed


@given(st.lists(st.one_of(st.none(), st.floats(0, 10, allow_nan=False)), max_size=50))
def test_arrivals_count_every_call_and_keep_the_least_time_left(lefts: list[float | None]) -> None:
    arrivals = Arrivals()
    for left in lefts:
        arrivals.note(left)
    known = [x for x in lefts if x is not None]
    assert arrivals.take() == (len(lefts), min(known) if known else None)
    assert arrivals.take() == (0, None)  # taking starts again
