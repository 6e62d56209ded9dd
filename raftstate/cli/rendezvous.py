"""``raftstate rendezvous``: run the ICE rendezvous service.

Nodes with ``reach = "ice"`` exchange their ICE candidates through it (see
:mod:`raftstate.transport.rendezvous`). It holds only the rendezvous
credential, never the cluster secret: ``RAFTSTATE_RENDEZVOUS_SECRET`` or else
the ``rendezvous_secret`` key of the ``--config`` file. Relayed offers are
sealed end to end between nodes, so the rendezvous host can neither read nor
forge them. ``--listen :PORT`` binds loopback; give ``0.0.0.0:PORT`` to serve
other hosts. Connections are capped (``--max-connections``,
``--max-per-source``) and cut if they do not authenticate within
``--handshake-timeout`` seconds. Prints the bound address on one line, runs
until SIGINT/SIGTERM, then prints a one-line summary. Exit codes: 0 after a
signal, 1 if it cannot listen, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping

from raftstate.cli.argtypes import COUNT, SECONDS
from raftstate.errors import ConfigError
from raftstate.secretcheck import check_secret
from raftstate.transport.rendezvous import (
    HANDSHAKE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_PER_SOURCE,
)

SECRET_ENV = "RAFTSTATE_RENDEZVOUS_SECRET"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        required=True,
        metavar="HOST:PORT",
        help="port 0: any free port; ':PORT' binds loopback (0.0.0.0:PORT for every interface)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file with rendezvous_secret (node config or cluster.toml); {SECRET_ENV} wins",
    )
    p.add_argument("--max-connections", type=COUNT, default=MAX_CONNECTIONS, metavar="N",
                   help=f"connections open at once (default {MAX_CONNECTIONS})")  # fmt: skip
    p.add_argument("--max-per-source", type=COUNT, default=MAX_PER_SOURCE, metavar="N",
                   help=f"connections from one IP (default {MAX_PER_SOURCE})")  # fmt: skip
    p.add_argument("--handshake-timeout", type=SECONDS, default=HANDSHAKE_TIMEOUT_S, metavar="S",
                   help=f"seconds to authenticate (default {HANDSHAKE_TIMEOUT_S:g})")  # fmt: skip


def rendezvous_secret(config: str | None, environ: Mapping[str, str]) -> str:
    """The secret from ``environ`` or else the config file. Raises
    :class:`ConfigError` naming ``rendezvous_secret`` (or the file) and what to do."""
    secret: object = environ.get(SECRET_ENV) or None
    if secret is None and config is not None:
        try:
            with open(config, "rb") as fh:
                secret = tomllib.load(fh).get("rendezvous_secret")
        except FileNotFoundError:
            raise ConfigError(f"config file {config} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config} cannot be read as TOML: {exc}") from None
    if not secret:
        where = f"in {config}" if config else "with --config FILE"
        raise ConfigError(
            f"rendezvous_secret: not set; give the rendezvous credential {where} (the nodes' "
            f"rendezvous_secret, not the cluster secret) or in {SECRET_ENV}"
        )
    if not isinstance(secret, str):
        raise ConfigError("rendezvous_secret: must be a string")
    check_secret("rendezvous_secret", secret)
    return secret


def _listen_address(value: str) -> tuple[str, int]:
    """``HOST:PORT``; an empty host is loopback (never every interface)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen: {value!r} must be HOST:PORT (port 0 picks a free port)")
    return (host.strip("[]") or "127.0.0.1"), int(port)


async def _serve(secret: str, host: str, port: int, args: argparse.Namespace) -> int:
    from raftstate.transport.rendezvous import RendezvousServer

    server = RendezvousServer(
        secret,
        max_connections=args.max_connections,
        max_per_source=args.max_per_source,
        handshake_timeout_s=args.handshake_timeout,
    )
    try:
        bound_host, bound_port = await server.start(host, port)
    except OSError as exc:
        print(f"raftstate rendezvous: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        await server.close()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"rendezvous listening on {shown}:{bound_port}", flush=True)
    started = loop.time()
    try:
        await stop.wait()
    finally:
        await server.close()
    print(f"rendezvous on {shown}:{bound_port} stopped after {loop.time() - started:.0f}s")
    return 0


def rendezvous_main(args: argparse.Namespace) -> int:
    """Run the service until signalled. Returns the exit code."""
    try:
        secret = rendezvous_secret(args.config, os.environ)
        host, port = _listen_address(args.listen)
        if args.max_connections < 1 or args.max_per_source < 1 or not args.handshake_timeout > 0:
            raise ConfigError(
                "--max-connections, --max-per-source, --handshake-timeout: must be positive"
            )
    except ConfigError as err:
        print(f"raftstate rendezvous: {err.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(secret, host, port, args))
    return uvloop.run(_serve(secret, host, port, args))
