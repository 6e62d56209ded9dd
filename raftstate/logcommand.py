"""The format of a Raft log entry's command (pure functions).

pysyncobj stores each entry's command as opaque bytes whose first byte is its
command type (``REGULAR`` 0, ``NO_OP`` 1, ``MEMBERSHIP`` 2, ``VERSION`` 3).
Its ``@replicated`` decorator fills a REGULAR command with
``pickle.dumps((funcID, args))`` and every follower unpickles it on apply, so
an entry in an AppendEntries (or in the journal on disk) was code. raftstate
does not use ``@replicated``: :meth:`RaftNode.propose` proposes

    ``b"\\x00"`` (REGULAR) ``+ b"RSB" + b"\\x01"`` (format 1) ``+ HeartbeatBatch``

and ``RaftNode`` replaces pysyncobj's apply step with :func:`decode`, which
returns the protobuf bytes, ``None`` for the NO_OP a new leader appends, and
raises :class:`~raftstate.errors.DecodeError` for anything else (pysyncobj's
pickled membership/version commands included). Nothing is unpickled.

A data directory written before this format (pickled commands) does not
replay; raftstate is pre-1.0 and has no migration for it.
"""

from __future__ import annotations

from raftstate.errors import DecodeError

#: pysyncobj's command type bytes (``pysyncobj.syncobj._COMMAND_TYPE``).
REGULAR = b"\x00"
NO_OP = b"\x01"
#: REGULAR + "RSB" (raftstate batch) + format version 1.
BATCH_PREFIX = REGULAR + b"RSB\x01"


def encode(batch: bytes) -> bytes:
    """The log command carrying one serialized ``HeartbeatBatch``."""
    return BATCH_PREFIX + batch


def is_batch(command: object) -> bool:
    """Whether ``command`` is a command :func:`encode` made."""
    return isinstance(command, bytes) and command.startswith(BATCH_PREFIX)


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


__all__ = ["BATCH_PREFIX", "NO_OP", "REGULAR", "decode", "encode", "is_batch"]
