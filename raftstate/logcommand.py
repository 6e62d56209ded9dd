"""The format of a Raft log entry's command (pure functions).

pysyncobj stores each entry's command as opaque bytes whose first byte is its
command type (``REGULAR`` 0, ``NO_OP`` 1, ``MEMBERSHIP`` 2, ``VERSION`` 3).
Its ``@replicated`` decorator fills a REGULAR command with
``pickle.dumps((funcID, args))`` and every follower unpickles it on apply, so
an entry in an AppendEntries (or in the journal on disk) was code. raftstate
does not use ``@replicated``: :meth:`RaftNode.propose` proposes

    ``b"\\x00"`` (REGULAR) ``+ b"RSB" + b"\\x01"`` (format 1) ``+ HeartbeatBatch``

and, for what is not heartbeats (deletes, credential revocations),

    ``b"\x00" + b"RSC" + b"\x01" + ControlCommand`` (:func:`encode_control`)

``RaftNode`` replaces pysyncobj's apply step with :func:`parse`, which
returns the kind and the protobuf bytes, ``None`` for the NO_OP a new leader
appends, and raises :class:`~raftstate.errors.DecodeError` for anything else
(pysyncobj's pickled membership/version commands included). Nothing is
unpickled. Both kinds share one log, so a delete is ordered with the
heartbeats of the same device by log position, like everything else.

A data directory written before this format (pickled commands) does not
replay; raftstate is pre-1.0 and has no migration for it.
"""

from __future__ import annotations

import enum

from raftstate.errors import DecodeError

#: pysyncobj's command type bytes (``pysyncobj.syncobj._COMMAND_TYPE``).
REGULAR = b"\x00"
NO_OP = b"\x01"
#: REGULAR + "RSB" (raftstate batch) + format version 1.
BATCH_PREFIX = REGULAR + b"RSB\x01"
#: REGULAR + "RSC" (raftstate control) + format version 1.
CONTROL_PREFIX = REGULAR + b"RSC\x01"


class Kind(enum.Enum):
    BATCH = "batch"  # a storage_pb2.HeartbeatBatch
    CONTROL = "control"  # a storage_pb2.ControlCommand


def encode(batch: bytes) -> bytes:
    """The log command carrying one serialized ``HeartbeatBatch``."""
    return BATCH_PREFIX + batch


def encode_control(command: bytes) -> bytes:
    """The log command carrying one serialized ``ControlCommand``."""
    return CONTROL_PREFIX + command


def is_batch(command: object) -> bool:
    """Whether ``command`` is a command :func:`encode` made."""
    return isinstance(command, bytes) and command.startswith(BATCH_PREFIX)


def is_ours(command: object) -> bool:
    """Whether ``command`` is a command :func:`encode` or :func:`encode_control` made."""
    return isinstance(command, bytes) and (
        command.startswith(BATCH_PREFIX) or command.startswith(CONTROL_PREFIX)
    )


def parse(command: bytes) -> tuple[Kind, bytes] | None:
    """The kind and protobuf bytes of one of our commands; ``None`` for
    pysyncobj's NO_OP. Raises ``DecodeError`` for anything else."""
    if isinstance(command, bytes) and command.startswith(CONTROL_PREFIX):
        return Kind.CONTROL, command[len(CONTROL_PREFIX) :]
    batch = decode(command)
    return None if batch is None else (Kind.BATCH, batch)


def decode(command: bytes) -> bytes | None:
    """The ``HeartbeatBatch`` bytes of a batch command; ``None`` for pysyncobj's
    NO_OP. Raises ``DecodeError`` for anything else."""
    if isinstance(command, bytes):
        if command.startswith(BATCH_PREFIX):
            return command[len(BATCH_PREFIX) :]
        if command == NO_OP:
            return None
    head = bytes(command[:5]) if isinstance(command, (bytes, bytearray)) else b""
    raise DecodeError(
        f"log entry is not a raftstate command (starts {head!r}); a data_dir written by "
        "raftstate before the pickle-free log format must be wiped"
    )


__all__ = [
    "BATCH_PREFIX",
    "CONTROL_PREFIX",
    "NO_OP",
    "REGULAR",
    "Kind",
    "decode",
    "encode",
    "encode_control",
    "is_batch",
    "is_ours",
    "parse",
]
