"""The search for one device: Wing & Gong's DFS with Lowe's and Porcupine's pruning.

Theory of operation
-------------------
The model is one device's state: absent, or the :class:`DeviceValue` of the
write with the highest ``seq`` applied so far (``statemachine.py`` rule 1: a
heartbeat with ``seq <= stored seq`` changes nothing). Absent behaves as
``seq = 0``. An op is legal in a state when the model would have answered what
the client saw:

* read: the state equals the returned value (or is absent for "not found");
* write answered ``duplicate=False``: stored seq ``< seq`` (and
  ``stored_seq == seq``); the state becomes the written value;
* write answered ``duplicate=True``: stored seq ``== stored_seq >= seq``;
* write with an unknown outcome: always legal, result unconstrained;
* delete answered ``deleted=True``: the state is present with
  ``seq == deleted_seq``; the state becomes absent;
* delete answered ``deleted=False``: the state is absent (and stays so);
* delete with an unknown outcome: always legal; absent afterwards;
* expiry (the server's write, always an unknown outcome): the state is
  exactly the expiry's value with ``online=True``; it becomes the same value
  with ``online=False``. A later heartbeat (higher seq) is online again.

Search (Wing & Gong 1993; Lowe 2017 "Testing for linearisability" §3;
Porcupine's ``checkSingle``):

1. Put every call and return event in one doubly linked list sorted by time.
   At equal times calls sort first, so touching ops count as concurrent and
   the checker errs towards "linearizable", never towards a false alarm.
   Failed writes get no return event (they return at +infinity), so the
   search never has to place them and succeeds once no return event is left.
2. The ops whose call comes before the first remaining return form the
   *window*: exactly the ops that may be linearized next. Linearizing one
   *lifts* it (unlinks its call and return), which may widen the window.
3. Depth-first search over configurations (ops linearized so far, state). At
   each configuration try, in call order, every op of the window that is worth
   trying; reaching the first return means every choice failed: undo the last
   choice and try the next one (backtracking with dancing links).
4. Memoize configurations already explored (Lowe's cache). The linearized
   set is kept as ``base`` (every definite op of lower return rank is in) plus
   a bitmask above it, so keys stay the size of the window, not the history.

Facts of this model prune the branching to almost nothing:

* Reads and duplicate writes do not change the state. One that is legal now
  can be moved to now in any linearization (everything that must precede it
  is already placed, or it would not be in the window), so it is placed
  without branching ("closure").
* The stored seq never decreases, so a failed write whose ``seq`` is at most
  the stored seq can never matter again: it is lifted for free. A failed
  write that did apply has ``seq`` at most the stored seq, so the state alone
  decides which failed writes are still live: they stay out of the memo key.
* Writes answered ``duplicate=False`` must be applied in increasing ``seq``
  order (a smaller one after a larger one would have been a duplicate), so
  only the lowest such write not yet placed is a candidate, and a live failed
  write is a candidate only if its ``seq`` is below that write's.

Deletes break the monotone seq: after one, a heartbeat of any seq applies
again. For a device with a delete that may have removed something
(``deleted=True`` or unknown) the search runs *non-monotone*: no free lifts,
every applied write with a higher seq than the state is a candidate (not
only the lowest), failed writes have no upper bound, and the memo key also
holds the set of placed unknown-outcome ops, since the state no longer
decides which of them are still live. Devices without such deletes keep
every pruning above (expiries included: once an expiry's seq is passed or
its value went offline, it can never apply again).

Pure code: the only outside input is ``clock``, read every 256 configurations
to stop at ``deadline``. Each call builds its own state; nothing is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from chaos.history import (
    DeleteResult,
    DeviceValue,
    HistoryError,
    Operation,
    OpKind,
    ReadResult,
    WriteResult,
)

(
    _READ,
    _APPLIED,
    _DUPLICATE,
    _UNKNOWN,
    _IMPOSSIBLE,
    _DELETED,
    _DELETE_ABSENT,
    _DELETE_UNKNOWN,
    _EXPIRE,
) = range(9)
#: Codes of ops that may make a device absent again (and so break monotone seqs).
_REMOVING = (_DELETED, _DELETE_UNKNOWN)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What searching one device's ops found.

    ``ok`` is ``True`` (linearizable), ``False`` (not) or ``None`` (out of
    time). When ``ok`` is ``False``: ``prefix`` is the longest linearization
    found, as indices into the searched ops, ``blocked`` the index of the op
    whose return came before it could be placed, and ``state`` the model state
    after ``prefix``.
    """

    ok: bool | None
    prefix: tuple[int, ...] = ()
    blocked: int = -1
    state: DeviceValue | None = None
    configurations: int = 0


def observations(op: Operation) -> tuple[object, ...]:
    """What the op proves was stored at some point: the exact value a read
    returned (and its online form: the value a heartbeat wrote), the
    ``stored_seq`` a duplicate write reported, the seq a delete removed, or
    the online value an expiry needs."""
    if isinstance(op.result, ReadResult) and op.result.value is not None:
        value = op.result.value
        return (value, value.with_online(True))
    if isinstance(op.result, WriteResult) and op.result.duplicate:
        return (op.result.stored_seq,)
    if isinstance(op.result, DeleteResult) and op.result.deleted:
        return (op.result.deleted_seq,)
    if op.kind is OpKind.EXPIRE and op.args is not None:
        return (op.args.with_online(True),)
    return ()


def legal_in(op: Operation, state: DeviceValue | None) -> bool:
    """Whether the model, in ``state``, could have answered ``op`` as recorded."""
    code, arg, _ = _encode(op, {})
    stored = 0 if state is None else state.seq
    if code == _READ:
        result = op.result
        return isinstance(result, ReadResult) and result.value == state
    if code == _APPLIED:
        return stored < arg
    if code in (_DUPLICATE, _DELETED):
        return state is not None and stored == arg
    if code == _DELETE_ABSENT:
        return state is None
    if code == _EXPIRE:
        return op.args is not None and state == op.args.with_online(True)
    return code in (_UNKNOWN, _DELETE_UNKNOWN)


def possible(op: Operation) -> bool:
    """Whether some state makes ``op`` legal (false for self-contradictory
    write results such as ``duplicate=True, stored_seq < seq``)."""
    return _encode(op, {})[0] != _IMPOSSIBLE


def requirement(op: Operation) -> str:
    """What the state must be for ``op`` to be legal, in words."""
    code, arg, _ = _encode(op, {})
    if code == _READ:
        return "needs the state to be exactly that"
    if code == _APPLIED:
        return f"needs stored seq < {arg}"
    if code == _DUPLICATE:
        return f"needs stored seq == {arg}"
    if code == _DELETED:
        return f"needs the device present with seq {arg}"
    if code == _DELETE_ABSENT:
        return "needs the device absent"
    if code == _EXPIRE:
        return "needs the device online with exactly that seq and reported map"
    if code in (_UNKNOWN, _DELETE_UNKNOWN):
        return "is unconstrained"
    return (
        "is impossible in any state (applied needs stored_seq == seq, duplicate needs "
        "stored_seq >= seq, a delete needs deleted_seq >= 1)"
    )


def _encode(op: Operation, values: dict[DeviceValue | None, int]) -> tuple[int, int, int]:
    """``(code, arg, value id)`` of ``op``; interns values into ``values``."""
    result = op.result
    if op.kind is OpKind.READ:
        if not isinstance(result, ReadResult):
            raise HistoryError(f"op {op.op_id}: only reads with a ReadResult can be searched")
        return _READ, values.setdefault(result.value, len(values)), 0
    if op.kind is OpKind.DELETE:
        if result is None:
            return _DELETE_UNKNOWN, 0, 0
        if not isinstance(result, DeleteResult):
            raise HistoryError(f"op {op.op_id}: a delete needs a DeleteResult")
        if not result.deleted:
            return _DELETE_ABSENT, 0, 0
        return (_DELETED if result.deleted_seq >= 1 else _IMPOSSIBLE), result.deleted_seq, 0
    if op.kind is OpKind.EXPIRE:
        if op.args is None or result is not None:
            raise HistoryError(f"op {op.op_id}: an expiry needs a value and no result")
        before = values.setdefault(op.args.with_online(True), len(values))
        return _EXPIRE, before, values.setdefault(op.args, len(values))
    if op.args is None or not isinstance(result, WriteResult | None):
        raise HistoryError(f"op {op.op_id}: a write needs a DeviceValue and a WriteResult")
    written = values.setdefault(op.args, len(values))
    if result is None:
        return _UNKNOWN, op.args.seq, written
    if not result.duplicate:
        ok = result.stored_seq == op.args.seq
        return (_APPLIED if ok else _IMPOSSIBLE), op.args.seq, written
    ok = result.stored_seq >= op.args.seq
    return (_DUPLICATE if ok else _IMPOSSIBLE), result.stored_seq, written


def search(ops: Sequence[Operation], *, deadline: float, clock: Callable[[], float]) -> Outcome:
    """Decide whether ``ops`` (one device, each with a definite result or a
    write with an unknown outcome) is linearizable. Failed reads must have been
    dropped. Returns ``Outcome(ok=None)`` once ``clock() > deadline``. Raises
    ``HistoryError`` for an op it cannot model (a read without a result)."""
    values: dict[DeviceValue | None, int] = {None: 0}
    codes: list[int] = []
    args: list[int] = []
    writes: list[int] = []
    for op in ops:
        code, arg, written = _encode(op, values)
        codes.append(code)
        args.append(arg)
        writes.append(written)
    value_of: list[DeviceValue | None] = list(values)
    vseq = [0 if v is None else v.seq for v in value_of]
    monotone = not any(c in _REMOVING for c in codes)
    # Ordinals of the ops without a return event, for the non-monotone memo key.
    uord = [0] * len(ops)
    for n, i in enumerate(i for i, op in enumerate(ops) if op.return_ns is None):
        uord[i] = n
    applied_order = sorted(
        (i for i, c in enumerate(codes) if c == _APPLIED), key=lambda i: (args[i], i)
    )
    applied_seq = [args[i] for i in applied_order] + [max(args, default=0) + 1]
    applied_order.append(-1)

    # Entries 1..m are events sorted by (time, calls first, op index); 0 is the
    # head sentinel and m + 1 the tail sentinel.
    events: list[tuple[int, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call_ns, 0, i))
        if op.return_ns is not None:
            events.append((op.return_ns, 1, i))
    events.sort()
    m = len(events)
    op_of = [-1] * (m + 2)
    match = [-1] * (m + 2)  # call: its return entry, 0 if none; return or sentinel: -1
    rank = [0] * len(ops)  # return order of definite ops
    call_entry = [0] * len(ops)
    returns = 0
    for e, (_, is_return, i) in enumerate(events, start=1):
        op_of[e] = i
        if is_return:
            match[call_entry[i]] = e
            rank[i] = returns
            returns += 1
        else:
            call_entry[i] = e
            match[e] = 0
    nxt = list(range(1, m + 3))
    prv = list(range(-1, m + 1))

    # The configuration. `trail` is a persistent list of lifted entries, newest
    # first: (entry, placed, below); placed is False for free lifts.
    remaining = returns
    state = base = rel = nap = depth = unk = 0
    trail: Any = None
    stack: list[tuple[Any, int, int, int, int, int, int, int, int]] = []
    cache: set[tuple[int, int, int, int]] = set()
    best: Any = None
    best_depth, blocked, best_state = -1, -1, 0
    configs = 0

    while True:
        # Closure: place every legal read/duplicate in the window, free dead failed writes.
        e = nxt[0]
        while match[e] >= 0:
            i = op_of[e]
            code = codes[i]
            if code == _READ:
                lift = state == args[i]
            elif code == _DUPLICATE:
                lift = state != 0 and vseq[state] == args[i]
            elif code == _DELETE_ABSENT:
                lift = state == 0
            elif not monotone:
                lift = False
            elif code == _UNKNOWN:
                lift = vseq[state] >= args[i]
            else:  # dead for good once its seq is passed or its value went offline
                lift = code == _EXPIRE and vseq[state] >= vseq[args[i]] and state != args[i]
            if lift:
                nxt[prv[e]] = nxt[e]
                prv[nxt[e]] = prv[e]
                r = match[e]
                if r:
                    nxt[prv[r]] = nxt[r]
                    prv[nxt[r]] = prv[r]
                    remaining -= 1
                    rel |= 1 << (rank[i] - base)
                    depth += 1
                trail = (e, r > 0, trail)
                e = nxt[prv[e]]  # not nxt[e]: that may be the return just unlinked
            else:
                e = nxt[e]
        if rel & 1:
            ones = (~rel & (rel + 1)).bit_length() - 1
            rel >>= ones
            base += ones
        if not remaining:
            return Outcome(True, configurations=configs)
        configs += 1
        if not configs & 255 and clock() > deadline:
            return Outcome(None, configurations=configs)
        key = (base, rel, state, 0 if monotone else unk)
        if key in cache:
            e = -1  # explored before: fail without recording a new best
        else:
            cache.add(key)
            e = nxt[0]

        # Find the next choice at this configuration, backtracking as needed.
        while True:
            if e >= 0:
                next_seq = applied_seq[nap] if monotone else applied_seq[-1]
                while match[e] >= 0:
                    i = op_of[e]
                    code = codes[i]
                    if code == _APPLIED:
                        if vseq[state] < args[i] and (not monotone or i == applied_order[nap]):
                            break
                    elif code == _UNKNOWN:
                        if vseq[state] < args[i] < next_seq:
                            break
                    elif code == _EXPIRE:
                        if state == args[i]:
                            break
                    elif code == _DELETED:
                        if state != 0 and vseq[state] == args[i]:
                            break
                    elif code == _DELETE_UNKNOWN and state != 0:
                        break
                    e = nxt[e]
                if match[e] >= 0:
                    break
                if depth > best_depth:  # e is the first return: its op is stuck
                    best, best_depth, blocked, best_state = trail, depth, op_of[e], state
            if not stack:
                prefix: list[int] = []
                while best is not None:
                    if best[1]:
                        prefix.append(op_of[best[0]])
                    best = best[2]
                prefix.reverse()
                return Outcome(False, tuple(prefix), blocked, value_of[best_state], configs)
            saved, state, base, rel, nap, remaining, depth, unk, e = stack.pop()
            while trail is not saved:  # undo in reverse order of lifting
                u, _, trail = trail
                r = match[u]
                if r:
                    nxt[prv[r]] = r
                    prv[nxt[r]] = r
                nxt[prv[u]] = u
                prv[nxt[u]] = u
            e = nxt[e]

        # Take the choice at e.
        stack.append((trail, state, base, rel, nap, remaining, depth, unk, e))
        i = op_of[e]
        nxt[prv[e]] = nxt[e]
        prv[nxt[e]] = prv[e]
        r = match[e]
        if r:
            nxt[prv[r]] = nxt[r]
            prv[nxt[r]] = prv[r]
            remaining -= 1
            rel |= 1 << (rank[i] - base)
        else:
            unk |= 1 << uord[i]
        if codes[i] == _APPLIED:
            nap += 1
        depth += 1
        state = writes[i]
        trail = (e, True, trail)
