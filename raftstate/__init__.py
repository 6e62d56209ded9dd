"""raftstate: a Raft-replicated device state store for IoT fleets.

The device SDK lives in :mod:`raftstate.sdk`; a node is run with
``raftstate node --config FILE`` (see :mod:`raftstate.node`).
"""

from raftstate.config import Member, NodeConfig
from raftstate.errors import (
    ConfigError,
    DeadlineExceeded,
    DecodeError,
    InvalidArgument,
    NotFound,
    NotLeader,
    QuotaExceeded,
    RaftStateError,
    ResourceExhausted,
    Unavailable,
)
from raftstate.model import Consistency, OnlineFilter

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Consistency",
    "DeadlineExceeded",
    "DecodeError",
    "InvalidArgument",
    "Member",
    "NodeConfig",
    "NotFound",
    "NotLeader",
    "OnlineFilter",
    "RaftStateError",
    "QuotaExceeded",
    "ResourceExhausted",
    "Unavailable",
    "__version__",
]
