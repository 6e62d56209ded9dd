"""Chaos testing support: record what clients saw, then check it.

:class:`History` records client operations from any thread or asyncio task;
:func:`check` decides whether the recorded history is linearizable, device by
device, and explains a violation with a small counterexample.
"""

from chaos.history import (
    ClientId,
    DeleteResult,
    DeviceValue,
    History,
    HistoryError,
    Operation,
    OpKind,
    ReadResult,
    Reported,
    Result,
    WriteResult,
    freeze_reported,
)
from chaos.linearizability import CheckResult, DeviceFailure, Verdict, check

__all__ = [
    "CheckResult",
    "ClientId",
    "DeleteResult",
    "DeviceFailure",
    "DeviceValue",
    "History",
    "HistoryError",
    "OpKind",
    "Operation",
    "ReadResult",
    "Reported",
    "Result",
    "Verdict",
    "WriteResult",
    "check",
    "freeze_reported",
]
