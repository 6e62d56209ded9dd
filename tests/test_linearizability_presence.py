"""The linearizability checker with deletes and expiries (sans-IO).

An expiry is the server's write (the device goes offline at its stored seq);
a delete makes the device absent, after which any seq applies again. A read
must be explained by some order of heartbeats, deletes and expiries. Times in
hand-written histories are in milliseconds.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
import time

from chaos import (
    DeleteResult,
    DeviceValue,
    History,
    HistoryError,
    Operation,
    OpKind,
    ReadResult,
    WriteResult,
    check,
)

MS = 1_000_000
_ids = itertools.count(1)


def write(call: float, ret: float | None, seq: int, v: str = "x", *, dup: int = 0) -> Operation:
    """A heartbeat; ``ret=None``: unknown outcome; ``dup``: answered duplicate of that seq."""
    result = None if ret is None else WriteResult(dup > 0, dup or seq)
    return Operation(
        next(_ids), "w", OpKind.WRITE, "d", DeviceValue.of(seq, {"v": v}),
        int(call * MS), None if ret is None else int(ret * MS), result,
    )


def read(
    call: float, ret: float, seq: int | None, v: str = "x", *, online: bool = True
) -> Operation:
    value = None if seq is None else DeviceValue.of(seq, {"v": v}, online=online)
    return Operation(
        next(_ids), "r", OpKind.READ, "d", None, int(call * MS), int(ret * MS), ReadResult(value)
    )


def delete(call: float, ret: float | None, deleted_seq: int | None) -> Operation:
    """``deleted_seq=None``: answered "nothing to delete"; ``ret=None``: unknown outcome."""
    result = None
    if ret is not None:
        result = DeleteResult(deleted_seq is not None, deleted_seq or 0)
    return Operation(
        next(_ids), "del", OpKind.DELETE, "d", None, int(call * MS),
        None if ret is None else int(ret * MS), result,
    )


def expire(call: float, seq: int, v: str = "x") -> Operation:
    value = DeviceValue.of(seq, {"v": v}, online=False)
    return Operation(next(_ids), "server", OpKind.EXPIRE, "d", value, int(call * MS))


# ---- hand-written ---------------------------------------------------------------------


def test_read_after_a_completed_delete_must_not_find_the_device() -> None:
    ok = [write(0, 1, 5), delete(2, 3, 5), read(4, 5, None)]
    assert check(ok).ok
    stale = read(4, 5, 5)
    result = check([write(0, 1, 5), delete(2, 3, 5), stale])
    assert not result.ok and result.failures[0].failing_op == stale


def test_heartbeat_after_a_delete_applies_with_any_seq() -> None:
    ops = [write(0, 1, 9, "a"), delete(2, 3, 9), write(4, 5, 2, "b"), read(6, 7, 2, "b")]
    assert check(ops).ok


def test_a_low_seq_applied_without_a_delete_is_caught() -> None:
    ops = [write(0, 1, 9, "a"), write(4, 5, 2, "b"), read(6, 7, 2, "b")]
    assert not check(ops).ok


def test_delete_must_remove_the_seq_it_reports() -> None:
    assert not check([write(0, 1, 3), delete(2, 3, 2)]).ok
    assert not check([delete(0, 1, 1)]).ok  # nothing was ever written
    assert check([delete(0, 1, None), write(2, 3, 1), delete(4, 5, 1), delete(6, 7, None)]).ok
    assert not check([write(0, 1, 1), delete(2, 3, None)]).ok


def test_failed_delete_may_take_effect_or_not() -> None:
    gone = [write(0, 1, 1), delete(2, None, None), read(10, 11, None)]
    kept = [write(0, 1, 1), delete(2, None, None), read(10, 11, 1)]
    assert check(gone).ok and check(kept).ok
    # ...but not before it was invoked.
    assert not check([write(0, 1, 1), read(1.5, 1.8, None), delete(2, None, None)]).ok


def test_failed_delete_then_failed_write_can_recreate_a_lower_seq() -> None:
    # Non-monotone: the failed write of seq 1 is below the stored seq 4 when
    # the read starts, and still may apply after the failed delete.
    ops = [write(0, 1, 1), write(2, 3, 4), delete(4, None, None), write(0.5, None, 1),
           read(10, 11, 1)]
    ops[3] = dataclasses.replace(ops[3], args=DeviceValue.of(1, {"v": "late"}))
    ops[4] = read(10, 11, 1, "late")
    assert check(ops).ok


def test_offline_read_is_explained_by_an_expiry_of_that_value() -> None:
    ops = [write(0, 1, 1, "a"), read(2, 3, 1, "a", online=False), read(4, 5, 1, "a", online=False)]
    result = check(ops)
    assert result.ok, result.explain()
    assert check(ops, infer_expiries=False).ok is False


def test_offline_read_of_an_overwritten_value_is_caught() -> None:
    # seq 2 completed before the read began: no expiry can bring back seq 1.
    stale = read(4, 5, 1, "a", online=False)
    result = check([write(0, 1, 1, "a"), write(2, 3, 2, "b"), stale])
    assert not result.ok and result.failures[0].failing_op == stale


def test_device_back_online_only_by_a_newer_heartbeat() -> None:
    # Offline, then online again at the same seq: nothing can do that.
    back = read(4, 5, 1, "a")
    result = check([write(0, 1, 1, "a"), read(2, 3, 1, "a", online=False), back])
    assert not result.ok and result.failures[0].failing_op == back
    # A duplicate heartbeat does not revive it either; a new seq does.
    assert not check([write(0, 1, 1, "a"), read(2, 3, 1, "a", online=False),
                      write(3.5, 3.8, 1, "a", dup=1), read(4, 5, 1, "a")]).ok
    assert check([write(0, 1, 1, "a"), read(2, 3, 1, "a", online=False),
                  write(3.5, 3.8, 2, "b"), read(4, 5, 2, "b")]).ok


def test_recorded_expiry_cannot_act_before_it_was_invoked() -> None:
    ops = [write(0, 1, 1), read(2, 3, 1, online=False), expire(5, 1)]
    assert not check(ops).ok
    assert check([write(0, 1, 1), expire(1.5, 1), read(2, 3, 1, online=False)]).ok


def test_expiry_then_delete_then_new_device_online() -> None:
    ops = [write(0, 1, 7, "a"), read(2, 3, 7, "a", online=False), delete(4, 5, 7),
           read(6, 7, None), write(8, 9, 1, "b"), read(10, 11, 1, "b")]
    assert check(ops).ok


def test_history_accepts_and_round_trips_deletes_and_expiries() -> None:
    history = History()
    w = history.invoke_write("c", "d", 3, {"k": "v"})
    history.ok(w, WriteResult(False, 3, 10))
    history.record_expiry("d", DeviceValue.of(3, {"k": "v"}, online=False))
    r = history.invoke_read("c", "d")
    history.ok(r, ReadResult(DeviceValue.of(3, {"k": "v"}, online=False)))
    d = history.invoke_delete("c", "d")
    history.ok(d, DeleteResult(True, 3, 12))
    again = History.from_json(history.to_json())
    assert again.ops() == history.ops()
    assert check(again).ok
    for bad in (
        lambda: history.invoke("c", OpKind.DELETE, "d", DeviceValue.of(1)),
        lambda: history.record_expiry("d", DeviceValue.of(1)),  # online: not an expiry
        lambda: history.invoke("c", OpKind.WRITE, "d", DeviceValue.of(1, online=False)),
        lambda: history.ok(history.invoke_delete("c", "d"), WriteResult(False, 1)),
    ):
        try:
            bad()
        except HistoryError:
            continue
        raise AssertionError("misuse accepted")


# ---- agreement with brute force -------------------------------------------------------


def _brute_force(ops: list[Operation]) -> bool:
    """Every order of the definite ops plus any subset of the unknown ones
    (inferred expiries included, as the checker adds them)."""
    known = {o.args for o in ops if o.kind is OpKind.EXPIRE}
    start = min(o.call_ns for o in ops)
    inferred = {
        o.result.value for o in ops
        if isinstance(o.result, ReadResult) and o.result.value is not None
        and not o.result.value.online and o.result.value not in known
    }
    ops = ops + [Operation(10_000 + n, "s", OpKind.EXPIRE, "d", v, start)
                 for n, v in enumerate(sorted(inferred, key=repr))]
    definite = [o for o in ops if o.result is not None]
    unknown = [o for o in ops if o.result is None]
    for k in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, k):
            for order in itertools.permutations(definite + list(chosen)):
                if _legal(order):
                    return True
    return False


def _legal(order: tuple[Operation, ...]) -> bool:
    for x, earlier in enumerate(order):
        for later in order[x + 1 :]:
            if later.return_ns is not None and later.return_ns < earlier.call_ns:
                return False
    state: DeviceValue | None = None
    for op in order:
        if op.kind is OpKind.READ:
            assert isinstance(op.result, ReadResult)
            if op.result.value != state:
                return False
        elif op.kind is OpKind.EXPIRE:
            assert op.args is not None
            if state != op.args.with_online(True):
                return False
            state = op.args
        elif op.kind is OpKind.DELETE:
            expected = DeleteResult(False) if state is None else DeleteResult(True, state.seq)
            state = None
            if op.result is not None and op.result != expected:
                return False
        else:
            assert op.args is not None
            if state is not None and op.args.seq <= state.seq:
                result = WriteResult(True, state.seq)
            else:
                result, state = WriteResult(False, op.args.seq), op.args
            if op.result is not None and op.result != result:
                return False
    return True


def _random_history(rng: random.Random, n: int) -> list[Operation]:
    values = [DeviceValue.of(s, {"v": x}) for s in (1, 2, 3) for x in "ab"]
    ops = []
    for i in range(n):
        call = rng.randrange(20)
        ret = call + rng.randrange(8)
        value = rng.choice(values)
        roll = rng.random()
        if roll < 0.1:
            ops.append(Operation(i, "c", OpKind.WRITE, "d", value, call))
        elif roll < 0.35:
            result = WriteResult(rng.random() < 0.3, rng.choice([value.seq, value.seq, 2, 3]))
            ops.append(Operation(i, "c", OpKind.WRITE, "d", value, call, ret, result))
        elif roll < 0.5:
            gone = DeleteResult(rng.random() < 0.6, rng.choice([1, 2, 3]))
            gone = gone if gone.deleted else DeleteResult(False)
            ops.append(Operation(i, "c", OpKind.DELETE, "d", None, call, ret, gone))
        elif roll < 0.55:
            ops.append(Operation(i, "c", OpKind.DELETE, "d", None, call))
        elif roll < 0.62:
            ops.append(Operation(i, "s", OpKind.EXPIRE, "d", value.with_online(False), call))
        else:
            seen = rng.choice([*values, None])
            if seen is not None and rng.random() < 0.4:
                seen = seen.with_online(False)
            ops.append(Operation(i, "c", OpKind.READ, "d", None, call, ret, ReadResult(seen)))
    return ops


def test_check_agrees_with_brute_force_with_deletes_and_expiries() -> None:
    rng = random.Random(20261207)
    verdicts = []
    for _ in range(700):
        ops = _random_history(rng, rng.randrange(1, 7))
        expected = _brute_force(ops)
        result = check(ops)
        assert result.ok == expected, ops
        if not result.ok:
            assert not _brute_force(list(result.failures[0].ops)), ops
        verdicts.append(expected)
    assert 50 < sum(verdicts) < 650


# ---- large simulated histories --------------------------------------------------------


def simulate_fleet(rng: random.Random, *, clients: int, devices: int, ops: int) -> History:
    """Clients heartbeat, read and delete devices of a perfect store whose
    server expires online devices at random instants. Each op takes effect at
    a random instant of its interval, so the history is linearizable; the
    expiries are not recorded (the checker must infer them)."""
    free = [(rng.randrange(1000), c) for c in range(clients)]
    plan = []  # (client, device, kind, value, call, effect, ret)
    next_seq = [0] * devices
    for _ in range(ops):
        t, c = heapq.heappop(free)
        call = t + rng.randrange(50_000)
        ret = call + rng.randrange(1, 400_000)
        d = rng.randrange(devices)
        roll = rng.random()
        kind, value = OpKind.READ, None
        if roll < 0.4:
            next_seq[d] += rng.randrange(1, 3)
            kind, value = OpKind.WRITE, DeviceValue.of(next_seq[d], {"v": str(rng.randrange(999))})
        elif roll < 0.5:
            kind = OpKind.DELETE
            if rng.random() < 0.5:
                next_seq[d] = 0  # the next device incarnation starts low again
        plan.append((c, f"dev-{d:02d}", kind, value, call, rng.randrange(call, ret + 1), ret))
        heapq.heappush(free, (ret, c))
    horizon = max(p[6] for p in plan)
    expiries = [(rng.randrange(horizon), f"dev-{rng.randrange(devices):02d}")
                for _ in range(ops // 10)]
    effects = sorted([(p[5], 0, k) for k, p in enumerate(plan)]
                     + [(at, 1, k) for k, (at, _) in enumerate(expiries)])
    state: dict[str, DeviceValue] = {}
    results: dict[int, WriteResult | ReadResult | DeleteResult] = {}
    for _, is_expiry, k in effects:
        if is_expiry:
            device = expiries[k][1]
            if device in state:
                state[device] = state[device].with_online(False)
            continue
        _, device, kind, value, *_ = plan[k]
        stored = state.get(device)
        if kind is OpKind.READ:
            results[k] = ReadResult(stored)
        elif kind is OpKind.DELETE:
            results[k] = DeleteResult(stored is not None, 0 if stored is None else stored.seq)
            state.pop(device, None)
        else:
            assert value is not None
            if stored is not None and value.seq <= stored.seq:
                results[k] = WriteResult(True, stored.seq)
            else:
                state[device], results[k] = value, WriteResult(False, value.seq)
    history = History()
    ops_out = []
    for k, (c, device, kind, value, call, _, ret) in enumerate(plan):
        ops_out.append(Operation(k, f"c{c}", kind, device, value, call, ret, results[k]))
    return History.from_ops(ops_out) if ops_out else history


def test_large_history_with_deletes_and_expiries_checks_quickly_and_catches_a_stale_read() -> None:
    history = simulate_fleet(random.Random(3), clients=10, devices=40, ops=8000)
    ops = history.ops()
    assert sum(isinstance(o.result, DeleteResult) and o.result.deleted for o in ops) > 100
    assert any(isinstance(o.result, ReadResult) and o.result.value is not None
               and not o.result.value.online for o in ops)
    started = time.perf_counter()
    result = check(ops)
    assert result.ok, result.explain()
    assert time.perf_counter() - started < 10.0
    # A read that began after a delete completed, made to see the deleted value.
    written: dict[tuple[str, int], DeviceValue] = {}
    deleted_at: dict[str, tuple[int, DeviceValue]] = {}
    for o in sorted(ops, key=lambda o: o.return_ns or 0):
        if o.kind is OpKind.WRITE and o.args is not None:
            written[o.device_id, o.args.seq] = o.args
        if isinstance(o.result, DeleteResult) and o.result.deleted and o.return_ns is not None:
            gone = written.get((o.device_id, o.result.deleted_seq))
            if gone is not None:
                deleted_at[o.device_id] = (o.return_ns, gone)
    for k, o in enumerate(ops):
        found = deleted_at.get(o.device_id)
        if (isinstance(o.result, ReadResult) and o.result.value is None and found
                and found[0] < o.call_ns):
            stale = dataclasses.replace(o, result=ReadResult(found[1]))
            mutated = [*ops[:k], stale, *ops[k + 1 :]]
            failed = check(mutated)
            assert [f.device_id for f in failed.failures] == [o.device_id]
            return
    raise AssertionError("no read after a delete to mutate")
