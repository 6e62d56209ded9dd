"""``raftstate rendezvous``: run the ICE rendezvous service.

Nodes with ``reach = "ice"`` exchange their ICE candidates through it (see
:mod:`raftstate.transport.rendezvous`). The cluster secret comes from
``RAFTSTATE_CLUSTER_SECRET`` or else from the ``cluster_secret`` key of the
``--config`` file (a node config, or the ``cluster.toml`` that
``raftstate cluster up`` writes). Prints the bound address on one line, runs
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

from raftstate.errors import ConfigError
from raftstate.transport.crypto import MIN_SECRET_LENGTH

SECRET_ENV = "RAFTSTATE_CLUSTER_SECRET"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="port 0: any free port")
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file with cluster_secret (node config or cluster.toml); {SECRET_ENV} wins",
    )


def cluster_secret(config: str | None, environ: Mapping[str, str]) -> str:
    """The secret from ``environ`` or else the config file. Raises
    :class:`ConfigError` naming ``cluster_secret`` (or the file) and what to do."""
    secret: object = environ.get(SECRET_ENV) or None
    if secret is None and config is not None:
        try:
            with open(config, "rb") as fh:
                secret = tomllib.load(fh).get("cluster_secret")
        except FileNotFoundError:
            raise ConfigError(f"config file {config} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config} cannot be read as TOML: {exc}") from None
    if not secret:
        where = f"in {config}" if config else "with --config FILE"
        raise ConfigError(
            f"cluster_secret: not set; give the cluster's secret {where} (e.g. the cluster.toml "
            f"that `raftstate cluster up` writes) or in {SECRET_ENV}"
        )
    if not isinstance(secret, str) or len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"cluster_secret: must be a string of at least {MIN_SECRET_LENGTH} characters"
        )
    return secret


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen: {value!r} must be HOST:PORT (port 0 picks a free port)")
    return host.strip("[]"), int(port)


async def _serve(secret: str, host: str, port: int) -> int:
    from raftstate.transport.rendezvous import RendezvousServer

    server = RendezvousServer(secret)
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
        secret = cluster_secret(args.config, os.environ)
        host, port = _listen_address(args.listen)
    except ConfigError as err:
        print(f"raftstate rendezvous: {err.message}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(secret, host, port))
    return uvloop.run(_serve(secret, host, port))
