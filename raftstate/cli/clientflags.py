"""The client flags of ``raftstate``: where the cluster is and who we are.

``--endpoints``, ``--deadline``, ``--ca``, ``--cert``, ``--key`` and
``--token-file`` are accepted anywhere on the command line of a client
command (``status``, ``device ...``, ``auth ...``, ``simulate``): before the
command, between its words, or after it. Given twice, the later one wins::

    raftstate --endpoints 10.0.0.1:7001 device get pump-17
    raftstate device get pump-17 --endpoints 10.0.0.1:7001

How: each parser level declares the flags with ``default=SUPPRESS`` (so a
level where a flag is absent writes nothing), the outer levels under a
``global_`` destination. :func:`resolve` then merges them (innermost wins),
fills in the environment (``RAFTSTATE_ENDPOINTS``, ``RAFTSTATE_CA``,
``RAFTSTATE_TOKEN``, ``RAFTSTATE_CERT``, ``RAFTSTATE_KEY``) and defaults, and
refuses the flags on a command that does not talk to a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raftstate.cli.argtypes import SECONDS, fail, readable_file

if TYPE_CHECKING:
    from raftstate.sdk.credentials import Credentials

DEFAULT_ENDPOINTS = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
DEFAULT_DEADLINE_S = 10.0
#: The commands that take the client flags (for the error message).
CLIENT_COMMANDS = "status, device, auth and simulate"


@dataclass(frozen=True, slots=True)
class Flag:
    """One client flag: its spelling, destination, type and help."""

    option: str
    dest: str
    metavar: str
    help: str
    type: object = str


FLAGS = (
    Flag(
        "--endpoints",
        "endpoints",
        "HOST:PORT,...",
        f"nodes to talk to (env RAFTSTATE_ENDPOINTS; default {DEFAULT_ENDPOINTS})",
    ),
    Flag(
        "--deadline",
        "deadline",
        "S",
        f"seconds per call, retries included (default {DEFAULT_DEADLINE_S:g})",
        SECONDS,
    ),
    Flag("--ca", "ca", "FILE", "CA certificate to trust (env RAFTSTATE_CA)", readable_file),
    Flag(
        "--token-file",
        "token_file",
        "FILE",
        "file holding a bearer token (env RAFTSTATE_TOKEN holds the token itself)",
        readable_file,
    ),
    Flag("--cert", "cert", "FILE", "client certificate (env RAFTSTATE_CERT)", readable_file),
    Flag("--key", "key", "FILE", "its private key (env RAFTSTATE_KEY)", readable_file),
)
GLOBAL_PREFIX = "global_"


def add_client_flags(p: argparse.ArgumentParser, *, outer: bool) -> None:
    """Declare the client flags on ``p``: a command's own parser
    (``outer=False``) or a level above it (``outer=True``)."""
    group = p.add_argument_group("client flags (also before the command)")
    for f in FLAGS:
        group.add_argument(
            f.option,
            dest=(GLOBAL_PREFIX + f.dest) if outer else f.dest,
            metavar=f.metavar,
            type=f.type,  # type: ignore[arg-type]
            default=argparse.SUPPRESS,
            help=f.help,
        )


def resolve(args: argparse.Namespace) -> None:
    """Merge the client flags given at any level into ``args`` (innermost
    wins), then set ``args.endpoints``, ``args.deadline`` and
    ``args.credentials`` for a client command (one whose parser set
    ``client=True``). Exits with status 2 and one line when a client flag is
    given to another command, or a credential file cannot be read."""
    client = bool(getattr(args, "client", False))
    for f in FLAGS:
        outer = vars(args).pop(GLOBAL_PREFIX + f.dest, None)
        if outer is None:
            continue
        if not client:
            fail("raftstate", f"{f.option} applies to {CLIENT_COMMANDS} only")
        if not hasattr(args, f.dest):
            setattr(args, f.dest, outer)
    if not client:
        return
    args.endpoints = (
        getattr(args, "endpoints", None)
        or os.environ.get("RAFTSTATE_ENDPOINTS")
        or DEFAULT_ENDPOINTS
    )
    args.deadline = getattr(args, "deadline", DEFAULT_DEADLINE_S)
    args.credentials = _credentials(args)


def _credentials(args: argparse.Namespace) -> Credentials:
    from raftstate.sdk.credentials import Credentials

    creds = Credentials.from_env()
    token_file = getattr(args, "token_file", None)
    if token_file is not None:
        token = _read(token_file, "--token-file").strip()
        if not token:
            fail("raftstate", f"--token-file: {token_file!r} is empty")
        creds = dataclasses.replace(creds, token=token)
    for name in ("ca", "cert", "key"):
        value = getattr(args, name, None)
        if value is not None:
            creds = dataclasses.replace(creds, **{name: value})
        else:  # a path from the environment: check it too, naming the variable
            env_value = getattr(creds, name)
            if isinstance(env_value, str):
                _read(env_value, f"RAFTSTATE_{name.upper()}")
    if (creds.cert is None) != (creds.key is None):
        fail("raftstate", "--cert and --key (RAFTSTATE_CERT, RAFTSTATE_KEY) go together")
    return creds


def _read(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        fail("raftstate", f"{what}: cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}")


__all__ = [
    "CLIENT_COMMANDS",
    "DEFAULT_DEADLINE_S",
    "DEFAULT_ENDPOINTS",
    "FLAGS",
    "add_client_flags",
    "resolve",
]
