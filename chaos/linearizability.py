"""Is a recorded history of heartbeats and gets linearizable? And if not, why?

Theory of operation
-------------------
Linearizability is *local* (Herlihy & Wing 1990, Theorem 1): a history is
linearizable iff its sub-history on every object is. Devices are independent
objects, so :func:`check` splits the history per device (P-compositionality,
Horn & Kroening 2015) and searches each part on its own; see
:mod:`chaos.search` for the model and the search. The store-wide ``revision``
links devices, so it is deliberately not checked here.

Steps, in order:

1. Drop reads with an unknown outcome; keep failed writes and deletes (they
   may have taken effect). Group by device, sort by call time. Expiries are
   the server's writes: for every offline value a read returned and no
   recorded ``EXPIRE`` op explains, add one (unknown outcome, invoked with the
   device's first op), so that a read is explained by *some* order of
   heartbeats, deletes and expiries; one per value is enough (after it the
   value is offline until a heartbeat or a delete changes the state).
2. Search each device under one overall deadline (and an optional per-device
   one). A device that runs out of time is reported *unknown*, never ok.
3. For a device that is not linearizable, build a counterexample and shrink
   it. Every shrinking step must keep the implication "the original history
   is linearizable ⇒ the smaller one is", so a failing smaller history is a
   genuine witness, not an artefact of deleting ops. Steps that keep it:

   * drop a read, or a write whose definite result says it changed nothing
     (or is impossible): every linearization stays valid without it;
   * drop any other write that no remaining op has observed (no read
     returned its value, no duplicate reported its seq as ``stored_seq``):
     only states between it and the next higher seq change, and no remaining
     op can have looked at them.

   Shrinking first cuts every op invoked after the stuck op returned, then
   deletes chunks of halving size (ddmin, Zeller 2002), re-searching after
   each deletion and keeping it only if the rest still fails. The result is
   1-minimal under those steps when the shrink budget allows.
4. Report the longest linearizable prefix found in the counterexample, the
   state it leaves and the op that could not be placed after it.

Pure code: ``clock`` is only read to enforce budgets. Safe to call from any
thread; nothing is shared between calls.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from chaos.history import (
    DeleteResult,
    DeviceValue,
    History,
    HistoryError,
    Operation,
    OpKind,
    ReadResult,
    WriteResult,
    validate_operation,
)
from chaos.search import Outcome, legal_in, observations, possible, requirement, search
from raftstate.cli.words import plural


class Verdict(enum.Enum):
    """The overall answer of :func:`check`."""

    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    #: Some device ran out of budget and none failed: nothing is proven.
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class DeviceFailure:
    """A shrunk counterexample for one device.

    ``ops`` is the counterexample in call order; on its own it is already not
    linearizable. ``linearized`` is the longest linearizable prefix found, in
    linearization order, ``state`` the device state it leaves, and
    ``failing_op`` the op whose response came before it could be placed.
    ``device_ops`` counts this device's ops in the checked history.
    """

    device_id: str
    ops: tuple[Operation, ...]
    failing_op: Operation
    linearized: tuple[Operation, ...]
    state: DeviceValue | None
    device_ops: int

    def reason(self) -> str:
        """One sentence on why ``failing_op`` could not be placed."""
        op = self.failing_op
        state = "absent" if self.state is None else self.state.render()
        head = f"op #{op.op_id} {op.describe()} -> {_render_result(op)}"
        if not possible(op):
            return f"{head} {requirement(op)}"
        if not legal_in(op, self.state):
            hint = ""
            seen = op.result.value if isinstance(op.result, ReadResult) else None
            if seen is not None and all(other.args != seen for other in self.ops):
                hint = (
                    "; no op shown writes that value (writes answered as duplicates "
                    "stored nothing and are left out)"
                )
            return (
                f"{head} {requirement(op)}, but the longest linearizable prefix "
                f"({len(self.linearized)} ops) leaves the device {state}{hint}"
            )
        return (
            f"{head} fits after the longest linearizable prefix ({len(self.linearized)} "
            f"ops, device {state}), but no order of the ops it overlaps lets "
            "everything that returned before it be placed"
        )

    def explain(self) -> str:
        """The counterexample as a table: times in ms relative to its first
        call, client, operation and result; ``>>`` marks ``failing_op``."""
        t0 = min(op.call_ns for op in self.ops)
        position = {op.op_id: n for n, op in enumerate(self.linearized, start=1)}
        header = ("", "lin", "op", "client", "call ms", "return ms", "operation", "result")
        rows = [header]
        for op in self.ops:
            returned = "?" if op.return_ns is None else f"{(op.return_ns - t0) / 1e6:.3f}"
            rows.append(
                (
                    ">>" if op.op_id == self.failing_op.op_id else "",
                    str(position.get(op.op_id, "-")),
                    f"#{op.op_id}",
                    str(op.client_id),
                    f"{(op.call_ns - t0) / 1e6:.3f}",
                    returned,
                    op.describe(),
                    _render_result(op),
                )
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        right = {1, 4, 5}
        lines = [
            f"device {self.device_id!r}: not linearizable "
            f"({len(self.ops)} of {self.device_ops} ops shown)",
            f"  {self.reason()}",
        ]
        for row in rows:
            cells = [
                cell.rjust(w) if c in right else cell.ljust(w)
                for c, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  " + "  ".join(cells).rstrip())
        lines.append(
            "  lin = place in the longest linearizable prefix ('-' not placed); "
            ">> = could not be linearized; return '?' = outcome unknown"
        )
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The verdict on a whole history.

    ``ok`` is true only when every device was searched to the end and found
    linearizable. ``devices_checked``/``ops_checked`` count the devices (and
    their ops) whose search finished; ``unknown`` names the devices that ran
    out of budget. ``failures`` holds one counterexample per failing device.
    """

    ok: bool
    devices_checked: int
    ops_checked: int
    failures: tuple[DeviceFailure, ...]
    unknown: tuple[str, ...] = ()
    elapsed_s: float = 0.0

    @property
    def timed_out(self) -> bool:
        return bool(self.unknown)

    @property
    def verdict(self) -> Verdict:
        if self.failures:
            return Verdict.NOT_LINEARIZABLE
        return Verdict.UNKNOWN if self.unknown else Verdict.LINEARIZABLE

    def explain(self) -> str:
        """A summary line, then every counterexample and the unknown devices."""
        lines = [
            f"{self.verdict.value}: {plural(self.devices_checked, 'device')}, "
            f"{plural(self.ops_checked, 'op')} "
            f"checked in {self.elapsed_s:.2f} s; {len(self.failures)} failed, "
            f"{len(self.unknown)} unknown"
        ]
        lines.extend(failure.explain() for failure in self.failures)
        if self.unknown:
            lines.append("out of budget, verdict unknown: " + ", ".join(self.unknown))
        return "\n".join(lines)


def check(
    history: History | Iterable[Operation],
    *,
    timeout_s: float | None = 60.0,
    device_timeout_s: float | None = None,
    shrink: bool = True,
    shrink_timeout_s: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    infer_expiries: bool = True,
) -> CheckResult:
    """Check that ``history`` is linearizable, one device at a time.

    ``timeout_s`` bounds the search over all devices and ``device_timeout_s``
    the search of each one (``None``: no bound); a device whose search hits a
    bound is reported in ``CheckResult.unknown``, never as linearizable.
    ``shrink_timeout_s`` bounds the time spent shrinking all counterexamples
    together and does not count against ``timeout_s``; a counterexample that
    is shrunk less (or not at all, with ``shrink=False``) is still valid.
    ``clock`` returns seconds and is only read to enforce these budgets.
    ``infer_expiries`` adds the expiry ops described in step 1 of the module
    docstring (ids above every recorded op's, client ``"server (inferred)"``).

    Raises ``HistoryError`` if an op is malformed or two ops share an id.
    Safe to call from any thread.
    """
    start = clock()
    deadline = math.inf if timeout_s is None else start + timeout_s
    ops = history.ops() if isinstance(history, History) else tuple(history)
    devices: dict[str, list[Operation]] = {}
    seen: set[int] = set()
    for op in ops:
        validate_operation(op)
        if op.op_id in seen:
            raise HistoryError(f"op id {op.op_id} appears twice")
        seen.add(op.op_id)
        if op.kind is OpKind.READ and op.result is None:
            continue  # a read with an unknown outcome constrains nothing
        devices.setdefault(op.device_id, []).append(op)
    if infer_expiries:
        next_id = max(seen, default=-1) + 1
        for part in devices.values():
            added = _inferred_expiries(part, next_id)
            next_id += len(added)
            part.extend(added)

    failures: list[DeviceFailure] = []
    unknown: list[str] = []
    checked_ops = 0
    shrink_left = shrink_timeout_s if shrink else 0.0
    for device_id in sorted(devices):
        part = sorted(devices[device_id], key=lambda o: (o.call_ns, o.op_id))
        now = clock()
        device_deadline = deadline
        if device_timeout_s is not None:
            device_deadline = min(deadline, now + device_timeout_s)
        outcome = (
            search(part, deadline=device_deadline, clock=clock)
            if now <= deadline
            else Outcome(None)
        )
        if outcome.ok is None:
            unknown.append(device_id)
            continue
        checked_ops += len(part)
        if outcome.ok is False:
            shrink_start = clock()
            small, found = _shrink(part, outcome, shrink_start + shrink_left, clock)
            spent = clock() - shrink_start
            shrink_left = max(0.0, shrink_left - spent)
            deadline += spent
            failures.append(_failure(device_id, small, found, len(part)))
    return CheckResult(
        ok=not failures and not unknown,
        devices_checked=len(devices) - len(unknown),
        ops_checked=checked_ops,
        failures=tuple(failures),
        unknown=tuple(unknown),
        elapsed_s=clock() - start,
    )


def _inferred_expiries(part: Sequence[Operation], first_id: int) -> list[Operation]:
    """One unknown-outcome ``EXPIRE`` op per offline value read in ``part``
    and not already the value of a recorded expiry, with ids from ``first_id``."""
    known = {op.args for op in part if op.kind is OpKind.EXPIRE}
    start = min(op.call_ns for op in part)
    wanted: dict[DeviceValue, None] = {}
    for op in part:
        if isinstance(op.result, ReadResult) and op.result.value is not None:
            value = op.result.value
            if not value.online and value not in known:
                wanted[value] = None
    return [
        Operation(first_id + n, "server (inferred)", OpKind.EXPIRE, part[0].device_id, value, start)
        for n, value in enumerate(wanted)
    ]


def _always_droppable(op: Operation) -> bool:
    """Reads, deletes that found nothing, and writes whose definite result
    says they changed nothing (or cannot happen), leave every linearization
    valid when removed."""
    if op.kind is OpKind.READ:
        return True
    if op.kind is not OpKind.WRITE:
        return isinstance(op.result, DeleteResult) and not op.result.deleted
    result = op.result
    return (
        isinstance(result, WriteResult)
        and op.args is not None
        and (result.duplicate or result.stored_seq != op.args.seq)
    )


def _droppable(current: Sequence[Operation], chunk: Iterable[Operation]) -> set[int]:
    """The ids of the ops in ``chunk`` that can be deleted from ``current``
    while keeping "current linearizable ⇒ the rest linearizable"."""
    chunk_ids = {op.op_id for op in chunk}
    observed: set[object] = set()
    for op in current:
        if op.op_id not in chunk_ids:
            observed.update(observations(op))
    return {
        op.op_id
        for op in current
        if op.op_id in chunk_ids
        and (
            _always_droppable(op)
            or (op.args is not None and op.args not in observed and op.args.seq not in observed)
        )
    }


def _shrink(
    ops: list[Operation], outcome: Outcome, deadline: float, clock: Callable[[], float]
) -> tuple[list[Operation], Outcome]:
    """The smallest failing sub-history found before ``deadline``, with its
    search outcome; ``(ops, outcome)`` itself if nothing smaller fails."""
    current, best = ops, outcome

    def attempt(drop: set[int]) -> bool:
        nonlocal current, best
        if not drop or clock() >= deadline:
            return False
        candidate = [op for op in current if op.op_id not in drop]
        found = search(candidate, deadline=deadline, clock=clock)
        if found.ok is not False:
            return False
        current, best = candidate, found
        return True

    stuck_return = ops[outcome.blocked].return_ns
    if stuck_return is not None:
        attempt(_droppable(current, [op for op in current if op.call_ns > stuck_return]))
    chunk = max(1, len(current) // 2)
    while clock() < deadline:
        progressed = False
        i = 0
        while i < len(current) and clock() < deadline:
            if attempt(_droppable(current, current[i : i + chunk])):
                progressed = True
            else:
                i += chunk
        if chunk > 1:
            chunk = max(1, min(chunk // 2, len(current) // 2))
        elif not progressed:
            break
    return current, best


def _failure(
    device_id: str, ops: list[Operation], outcome: Outcome, device_ops: int
) -> DeviceFailure:
    return DeviceFailure(
        device_id=device_id,
        ops=tuple(ops),
        failing_op=ops[outcome.blocked],
        linearized=tuple(ops[i] for i in outcome.prefix),
        state=outcome.state,
        device_ops=device_ops,
    )


def _render_result(op: Operation) -> str:
    return "unknown (failed)" if op.result is None else op.result.render()
