"""Unit tests of the linearizability checker and the history recorder (sans-IO).

Times in hand-written histories are in milliseconds, converted to ns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import heapq
import itertools
import random
import threading
import time

import pytest

from chaos import (
    DeviceValue,
    History,
    HistoryError,
    Operation,
    OpKind,
    ReadResult,
    Verdict,
    WriteResult,
    check,
)

MS = 1_000_000
_ids = itertools.count(1000)


def write(
    call: float,
    ret: float | None,
    seq: int,
    *,
    dup: bool = False,
    stored: int | None = None,
    v: str = "x",
    client: str = "c1",
    device: str = "d",
    op_id: int | None = None,
) -> Operation:
    """A heartbeat; ``ret=None`` means its outcome is unknown."""
    result = None if ret is None else WriteResult(dup, seq if stored is None else stored)
    return Operation(
        next(_ids) if op_id is None else op_id,
        client,
        OpKind.WRITE,
        device,
        DeviceValue.of(seq, {"v": v}),
        int(call * MS),
        None if ret is None else int(ret * MS),
        result,
    )


def read(
    call: float,
    ret: float,
    seq: int | None,
    *,
    v: str = "x",
    client: str = "c2",
    device: str = "d",
    op_id: int | None = None,
) -> Operation:
    """A get returning ``(seq, {"v": v})``, or not found when ``seq`` is None."""
    value = None if seq is None else DeviceValue.of(seq, {"v": v})
    return Operation(
        next(_ids) if op_id is None else op_id,
        client,
        OpKind.READ,
        device,
        None,
        int(call * MS),
        int(ret * MS),
        ReadResult(value),
    )


class FakeClock:
    def __init__(self, now: int = 0, step: int = 0) -> None:
        self.now = now
        self.step = step

    def __call__(self) -> int:
        self.now += self.step
        return self.now


# ---- single device, hand-written -----------------------------------------------------


def test_sequential_history_is_linearizable() -> None:
    ops = [
        read(0, 1, None),
        write(2, 3, 1, v="a"),
        read(4, 5, 1, v="a"),
        write(6, 7, 2, v="b"),
        write(8, 9, 1, v="a", dup=True, stored=2),
        read(10, 11, 2, v="b"),
    ]
    result = check(ops)
    assert result.ok and result.verdict is Verdict.LINEARIZABLE
    assert (result.devices_checked, result.ops_checked) == (1, 6)


@pytest.mark.parametrize("seen", [1, 2])
def test_read_overlapping_a_write_may_see_either_value(seen: int) -> None:
    ops = [
        write(0, 1, 1, v="v1"),
        write(2, 6, 2, v="v2"),
        read(3, 5, seen, v=f"v{seen}"),
    ]
    assert check(ops).ok


def test_overlapping_writes_may_apply_in_either_order() -> None:
    # seq 3 applied first makes seq 2 a duplicate; both orders happen in a real cluster.
    ops = [
        write(0, 10, 2, v="b", client="c1", dup=True, stored=3),
        write(1, 9, 3, v="c", client="c2"),
        read(11, 12, 3, v="c"),
    ]
    assert check(ops).ok


def test_stale_read_after_completed_write_is_caught() -> None:
    stale = read(6, 7, 1, v="a", op_id=3)
    ops = [write(0, 1, 1, v="a", op_id=1), write(2, 3, 2, v="b", op_id=2), stale]
    result = check(ops)
    assert not result.ok and result.verdict is Verdict.NOT_LINEARIZABLE
    failure = result.failures[0]
    assert failure.failing_op == stale
    assert failure.state == DeviceValue.of(2, {"v": "b"})


def test_read_of_a_value_never_written_is_caught() -> None:
    ops = [write(0, 1, 1, v="a"), read(2, 3, 1, v="zzz")]
    result = check(ops)
    assert not result.ok
    assert result.failures[0].ops == (ops[1],)


def test_not_found_after_a_completed_write_is_caught() -> None:
    assert not check([write(0, 1, 1), read(2, 3, None)]).ok


@pytest.mark.parametrize(
    "second",
    [
        pytest.param(write(2, 3, 1, v="a"), id="applied-though-seq-not-newer"),
        pytest.param(write(2, 3, 1, v="a", dup=True, stored=1), id="duplicate-wrong-stored-seq"),
        pytest.param(write(2, 3, 7, dup=True, stored=7), id="duplicate-of-a-newer-seq"),
    ],
)
def test_write_response_that_contradicts_the_state_is_caught(second: Operation) -> None:
    assert not check([write(0, 1, 5, v="e"), second]).ok


def test_duplicate_response_for_an_absent_device_is_caught() -> None:
    assert not check([write(0, 1, 3, dup=True, stored=3)]).ok


def test_impossible_write_response_is_a_one_op_counterexample() -> None:
    bad = write(4, 5, 2, stored=3)  # applied, yet stored_seq != seq
    result = check([write(0, 1, 1), read(2, 3, 1), bad])
    assert result.failures[0].ops == (bad,)


def test_touching_ops_count_as_concurrent() -> None:
    # The read's call and the write's return carry the same timestamp.
    assert check([write(0, 5, 1), read(5, 6, None)]).ok


# ---- unknown outcomes and retries -----------------------------------------------------


def test_failed_write_may_take_effect_after_it_failed() -> None:
    ops = [write(0, None, 1, v="a"), read(50, 51, None), read(60, 61, 1, v="a")]
    assert check(ops).ok


def test_failed_write_may_never_take_effect() -> None:
    ops = [write(0, None, 1, v="a"), read(50, 51, None), write(60, 61, 2), read(70, 71, 2)]
    assert check(ops).ok


def test_failed_write_cannot_take_effect_before_its_invocation() -> None:
    result = check([read(0, 1, 1, v="a"), write(2, None, 1, v="a")])
    assert not result.ok


def test_failed_write_cannot_be_undone_by_a_lower_seq() -> None:
    ops = [
        write(0, None, 5, v="e"),
        read(10, 11, 5, v="e"),
        read(20, 21, 4, v="d"),
        write(1, 2, 4, v="d"),
    ]
    assert not check(ops).ok


def test_retried_write_is_linearizable() -> None:
    ops = [
        write(0, 1, 1, v="a", client="c1"),
        write(2, 3, 1, v="a", client="c1", dup=True, stored=1),
        write(4, None, 2, v="b", client="c1"),
        write(5, 6, 2, v="b", client="c1", dup=True, stored=2),  # the failed try had applied
        write(7, None, 3, v="c", client="c1"),
        write(8, 9, 3, v="c", client="c1"),  # the failed try had not (yet) applied
        read(10, 11, 3, v="c"),
    ]
    assert check(ops).ok


def test_concurrent_retries_of_one_write_are_linearizable() -> None:
    ops = [write(0, 10, 1, client="c1"), write(1, 9, 1, dup=True, stored=1, client="c1")]
    assert check(ops).ok


def test_failed_reads_are_dropped() -> None:
    history = History(FakeClock(step=MS))
    history.fail(history.invoke_read("c1", "d"))
    op = history.invoke_write("c1", "d", 1, {})
    history.ok(op, WriteResult(False, 1))
    result = check(history)
    assert result.ok and result.ops_checked == 1


# ---- several devices ------------------------------------------------------------------


def test_devices_are_checked_independently() -> None:
    ops = [
        write(0, 1, 1, device="good"),
        read(2, 3, 1, device="good"),
        write(0, 1, 1, v="a", device="bad"),
        write(2, 3, 2, v="b", device="bad"),
        read(4, 5, 1, v="a", device="bad"),
        # Same seq on another device is not a duplicate there.
        write(4, 5, 1, device="other"),
    ]
    result = check(ops)
    assert not result.ok
    assert [f.device_id for f in result.failures] == ["bad"]
    assert result.devices_checked == 3
    assert "device 'bad'" in result.explain()


# ---- counterexamples ------------------------------------------------------------------


def test_counterexample_text_names_and_marks_the_offending_op() -> None:
    stale = read(26, 27, 1, v="a", client="reader-7", op_id=42)
    ops = [write(0, 1, 1, v="a", op_id=1), write(20, 25, 2, v="b", op_id=2), stale]
    text = check(ops).explain()
    marked = [line for line in text.splitlines() if line.lstrip().startswith(">>")]
    assert len(marked) == 1 and "#42" in marked[0] and "reader-7" in marked[0]
    assert "op #42 get() -> seq=1 {v=a}" in text
    assert "26.000" in marked[0] and "27.000" in marked[0]  # ms from the first call


def test_counterexample_is_shrunk_to_the_ops_that_matter() -> None:
    ops: list[Operation] = []
    for seq in range(1, 60):
        t = seq * 10
        ops.append(write(t, t + 2, seq, v=str(seq), client="w"))
        ops.append(read(t + 1, t + 4, seq - 1 if seq > 1 else None, v=str(seq - 1), client="r"))
    w58, w59 = ops[-4], ops[-2]
    stale = read(600, 601, 58, v="58", client="r")
    ops.append(stale)
    ops += [write(700 + s, 701 + s, 60 + s, v=str(60 + s)) for s in range(20)]
    failure = check(ops).failures[0]
    assert failure.failing_op == stale
    assert set(failure.ops) == {w58, w59, stale}
    assert failure.device_ops == len(ops)


def test_shrinking_can_be_turned_off() -> None:
    ops = [write(0, 1, 1, v="a"), write(2, 3, 2, v="b"), read(4, 5, 3, v="c"), read(6, 7, 2, v="b")]
    failure = check(ops, shrink=False).failures[0]
    assert len(failure.ops) == 4


# ---- budgets --------------------------------------------------------------------------


def test_device_out_of_budget_is_unknown_never_ok() -> None:
    ops = [write(0, 1, 1), read(2, 3, 1)]
    clock = FakeClock(step=10)  # every reading is 10 s later
    result = check(ops, timeout_s=5.0, clock=lambda: float(clock()))
    assert not result.ok
    assert result.verdict is Verdict.UNKNOWN and result.timed_out
    assert result.unknown == ("d",) and result.devices_checked == 0


# ---- agreement with brute force -------------------------------------------------------


def _brute_force_linearizable(ops: list[Operation]) -> bool:
    """Try every order of the definite ops plus any subset of the failed writes."""
    definite = [o for o in ops if o.result is not None]
    failed = [o for o in ops if o.result is None]
    for k in range(len(failed) + 1):
        for chosen in itertools.combinations(failed, k):
            for order in itertools.permutations(definite + list(chosen)):
                if _legal_order(order):
                    return True
    return False


def _legal_order(order: tuple[Operation, ...]) -> bool:
    for x, earlier in enumerate(order):
        for later in order[x + 1 :]:
            if later.return_ns is not None and later.return_ns < earlier.call_ns:
                return False
    state: DeviceValue | None = None
    for op in order:
        if isinstance(op.result, ReadResult):
            if op.result.value != state:
                return False
            continue
        assert op.args is not None
        if state is not None and op.args.seq <= state.seq:
            expected = WriteResult(True, state.seq)
        else:
            expected, state = WriteResult(False, op.args.seq), op.args
        if op.result is not None and op.result != expected:
            return False
    return True


def _small_random_history(rng: random.Random, n: int) -> list[Operation]:
    values = [DeviceValue.of(s, {"v": x}) for s in (1, 2, 3) for x in "ab"]
    ops = []
    for i in range(n):
        call = rng.randrange(20)
        ret = call + rng.randrange(8)
        value = rng.choice(values)
        roll = rng.random()
        if roll < 0.15:
            ops.append(Operation(i, "c", OpKind.WRITE, "d", value, call, None, None))
        elif roll < 0.55:
            result = WriteResult(rng.random() < 0.4, rng.choice([value.seq, value.seq, 2, 3]))
            ops.append(Operation(i, "c", OpKind.WRITE, "d", value, call, ret, result))
        else:
            seen = ReadResult(rng.choice([*values, None]))
            ops.append(Operation(i, "c", OpKind.READ, "d", None, call, ret, seen))
    return ops


def test_check_agrees_with_brute_force_on_small_random_histories() -> None:
    rng = random.Random(20240531)
    verdicts = []
    for _ in range(600):
        ops = _small_random_history(rng, rng.randrange(1, 7))
        expected = _brute_force_linearizable(ops)
        result = check(ops)
        assert result.ok == expected, ops
        if not result.ok:
            assert not _brute_force_linearizable(list(result.failures[0].ops)), ops
        verdicts.append(expected)
    assert 50 < sum(verdicts) < 550  # both verdicts well represented


# ---- large generated histories --------------------------------------------------------


def simulate_register(
    rng: random.Random, *, clients: int, devices: int, ops: int, fail_rate: float = 0.05
) -> History:
    """Run ``clients`` sequential clients against a perfect register per device.

    Each op takes effect at a random instant inside its [call, return] interval,
    so the recorded history is linearizable by construction. Failed writes take
    effect later, or never; failed reads are recorded as failures.
    """
    free = [(rng.randrange(1000), c) for c in range(clients)]
    next_seq = [0] * devices
    last_write: dict[tuple[int, int], DeviceValue] = {}
    plan = []  # [client, device, value or None, call, effect or None, return, failed]
    for _ in range(ops):
        t, c = heapq.heappop(free)
        call = t + rng.randrange(50_000)
        ret = call + rng.randrange(1, 400_000)
        effect: int | None = rng.randrange(call, ret + 1)
        d = rng.randrange(devices)
        failed = rng.random() < fail_rate
        value = None
        if rng.random() < 0.5:
            if (c, d) in last_write and rng.random() < 0.1:
                value = last_write[c, d]  # a retry of this client's last write
            else:
                next_seq[d] += 1
                value = DeviceValue.of(next_seq[d], {"v": str(rng.randrange(1000))})
            last_write[c, d] = value
            if failed:
                effect = None if rng.random() < 0.5 else ret + rng.randrange(2_000_000)
        plan.append((c, f"dev-{d:03d}", value, call, effect, ret, failed))
        heapq.heappush(free, (ret, c))

    results: dict[int, WriteResult | ReadResult] = {}
    state: dict[str, DeviceValue] = {}
    effects = {k: p[4] for k, p in enumerate(plan) if p[4] is not None}
    for k in sorted(effects, key=effects.__getitem__):
        _, device, value, *_ = plan[k]
        stored = state.get(device)
        if value is None:
            results[k] = ReadResult(stored)
        elif stored is not None and value.seq <= stored.seq:
            results[k] = WriteResult(True, stored.seq)
        else:
            state[device], results[k] = value, WriteResult(False, value.seq)

    clock = FakeClock()
    history = History(clock)
    events = sorted(
        [(p[3], 0, k) for k, p in enumerate(plan)] + [(p[5], 1, k) for k, p in enumerate(plan)]
    )
    op_ids: dict[int, int] = {}
    for clock.now, is_return, k in events:
        c, device, value, _, _, _, failed = plan[k]
        if not is_return:
            kind = OpKind.READ if value is None else OpKind.WRITE
            op_ids[k] = history.invoke(f"c{c}", kind, device, value)
        elif failed:
            history.fail(op_ids[k])
        else:
            history.ok(op_ids[k], results[k])
    return history


def _make_one_read_stale(ops: tuple[Operation, ...]) -> tuple[list[Operation], Operation]:
    """Replace one read's value with an older applied value of the same
    device, picking a read that began after a newer value's write completed."""
    applied_at: dict[tuple[str, int], int] = {}
    older: dict[str, list[DeviceValue]] = {}
    for op in ops:
        if isinstance(op.result, WriteResult) and op.args is not None and not op.result.duplicate:
            assert op.return_ns is not None
            applied_at[op.device_id, op.args.seq] = op.return_ns
            older.setdefault(op.device_id, []).append(op.args)
    for k, op in enumerate(ops):
        if not isinstance(op.result, ReadResult) or op.result.value is None:
            continue
        seen = op.result.value
        done = applied_at.get((op.device_id, seen.seq))
        stale = [v for v in older.get(op.device_id, []) if v.seq < seen.seq]
        if done is not None and done < op.call_ns and stale and k > len(ops) // 2:
            mutated = dataclasses.replace(op, result=ReadResult(stale[-1]))
            return [*ops[:k], mutated, *ops[k + 1 :]], mutated
    raise AssertionError("no read to mutate")


@functools.cache
def _large_history() -> History:
    return simulate_register(random.Random(7), clients=10, devices=100, ops=20_000)


def test_large_random_linearizable_history_checks_quickly() -> None:
    history = _large_history()
    started = time.perf_counter()
    result = check(history)
    elapsed = time.perf_counter() - started
    assert result.ok, result.explain()
    assert result.devices_checked == 100 and result.ops_checked > 19_000
    assert elapsed < 5.0  # about 0.1 s on a laptop; the bound only catches blow-ups


def test_large_random_history_with_one_stale_read_is_caught() -> None:
    ops, stale = _make_one_read_stale(_large_history().ops())
    result = check(ops)
    assert [f.device_id for f in result.failures] == [stale.device_id]
    failure = result.failures[0]
    assert failure.failing_op == stale
    assert len(failure.ops) == 3  # the stale read, the write it saw, the newer write
    assert f"#{stale.op_id}" in failure.explain()


def test_single_hot_device_with_many_clients_checks_quickly() -> None:
    history = simulate_register(random.Random(3), clients=30, devices=1, ops=5_000, fail_rate=0.2)
    assert check(history, timeout_s=10.0).ok


# ---- the recorder ---------------------------------------------------------------------


def test_history_records_call_and_return_times_from_its_clock() -> None:
    history = History(FakeClock(step=5))
    op = history.invoke_write("c1", "d", 1, {"k": "v"})
    history.ok(op, WriteResult(False, 1, revision=9))
    (recorded,) = history.ops()
    assert (recorded.call_ns, recorded.return_ns) == (5, 10)
    assert recorded.args == DeviceValue(1, (("k", "v"),))
    assert recorded.completed


def test_history_rejects_misuse() -> None:
    history = History(FakeClock(step=1))
    op = history.invoke_read("c1", "d")
    with pytest.raises(HistoryError):
        history.ok(op, WriteResult(False, 1))  # wrong kind of result
    history.ok(op, ReadResult.not_found())
    with pytest.raises(HistoryError):
        history.fail(op)  # already ended
    with pytest.raises(HistoryError):
        history.ok(99, ReadResult.not_found())
    with pytest.raises(HistoryError):
        history.invoke("c1", OpKind.WRITE, "d")  # a write needs a value
    with pytest.raises(HistoryError):
        DeviceValue.of(0)


def test_history_json_round_trip_preserves_everything() -> None:
    history = History(FakeClock(step=3))
    a = history.invoke_write("c1", "d", 2, {"temp": "21.5", "fw": "1.2"})
    b = history.invoke_read(7, "d")
    c = history.invoke_write("c1", "e", 1, {})
    d = history.invoke_read("c2", "e")
    history.ok(a, WriteResult(False, 2, revision=11))
    history.ok(b, ReadResult.found(2, {"temp": "21.5", "fw": "1.2"}))
    history.fail(c)
    history.invoke_read("c3", "e")  # never ends
    history.ok(d, ReadResult.not_found())

    restored = History.from_json(history.to_json())
    assert restored.ops() == history.ops()
    assert restored.to_json() == history.to_json()
    assert check(restored).ok and check(restored).ops_checked == 4  # the unended read is dropped
    with pytest.raises(HistoryError):
        restored.ok(c, WriteResult(False, 1))  # the failure survived the round trip
    with pytest.raises(HistoryError):
        History.from_json('{"format": "something-else", "ops": []}')
    with pytest.raises(HistoryError):
        History.from_json("[1, 2]")


def test_history_is_safe_to_record_from_threads_and_tasks() -> None:
    history = History()

    def client(name: str) -> None:
        for seq in range(1, 201):
            op = history.invoke_write(name, name, seq, {})
            history.ok(op, WriteResult(False, seq))

    async def async_client(name: str) -> None:
        for _ in range(200):
            op = history.invoke_read(name, "shared")
            await asyncio.sleep(0)
            history.ok(op, ReadResult.not_found())

    async def tasks() -> None:
        await asyncio.gather(*(async_client(f"task{i}") for i in range(4)))

    threads = [threading.Thread(target=client, args=(f"thread{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=asyncio.run, args=(tasks(),)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ops = history.ops()
    assert len(ops) == 1600 and [op.op_id for op in ops] == list(range(1600))
    assert all(op.completed for op in ops)
    assert check(history).ok
