"""``python -m chaos.proxy``: serve the Toxiproxy-compatible API until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from chaos.proxy.api import VERSION, ApiServer
from chaos.proxy.registry import ProxyRegistry
from raftstate.cli.argtypes import PORT_OR_ZERO, CliParser


def build_parser() -> argparse.ArgumentParser:
    """The ``raftstate-toxiproxy`` command line."""
    parser = CliParser(
        prog="raftstate-toxiproxy",
        description='Toxiproxy 2.x-compatible chaos proxy (TCP; UDP via "protocol": "udp").',
    )
    parser.add_argument(
        "--host",
        default="localhost",
        help="API listen host (default localhost; an empty host is loopback too, "
        "give 0.0.0.0 explicitly to listen on every interface)",
    )
    parser.add_argument(
        "--port", type=PORT_OR_ZERO, default=8474, help="API listen port; 0 picks one"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed toxic randomness")
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    api = ApiServer(ProxyRegistry(seed=args.seed))
    args.host = args.host or "127.0.0.1"
    try:
        host, port = await api.start(args.host, args.port)
    except OSError as exc:
        print(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another --port",
            file=sys.stderr,
        )
        return 1
    # The "listening" line is the readiness signal tests and scripts wait for.
    print(f"raftstate-toxiproxy {VERSION} API listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await api.close()
    with contextlib.suppress(OSError):  # stdout may be a pipe nobody reads any more
        print("raftstate-toxiproxy stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = _parse(argv)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
