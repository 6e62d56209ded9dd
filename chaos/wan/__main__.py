"""``python -m chaos.wan``: run the WAN emulator on a TUN device.

Example (inside the "wan" namespace)::

    python -m chaos.wan --dev wan0 --sites a=10.1.1.0/24,b=10.1.2.0/24 \\
        --impair 'a<>b:delay_ms=40,jitter_ms=2' --impair 'a>b:loss=0.01' \\
        --control 127.0.0.1:9100

``--impair`` takes ``SRC>DST:field=value,...`` (one direction), ``A<>B:...``
(both directions) or ``*:...`` (every ordered pair of distinct sites); later
flags override earlier ones per direction. Once the device is attached it
prints one JSON line ``{"event": "ready", ...}`` on stdout; on SIGINT/SIGTERM it
prints a one-line JSON summary and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
from dataclasses import asdict

import uvloop

from chaos.wan.scheduler import Impairment, ImpairmentError, SiteMap, WanScheduler
from chaos.wan.tun import TunDriver, UdpControl, open_tun


def parse_impair(spec: str, site_names: list[str]) -> list[tuple[str, str, Impairment]]:
    """Directions and impairment named by one ``--impair`` value. Raises
    :class:`ImpairmentError` for a malformed spec or an unknown site."""
    pairs_part, sep, fields_part = spec.partition(":")
    if not sep:
        raise ImpairmentError(f"--impair {spec!r} must look like 'a>b:delay_ms=40,...'")
    values: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in fields_part.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ImpairmentError(f"--impair field {item!r} must look like name=value")
        values[key.strip()] = value.strip()
    imp = Impairment.from_mapping(values)
    pairs_part = pairs_part.strip()
    if pairs_part == "*":
        return [(a, b, imp) for a in site_names for b in site_names if a != b]
    if "<>" in pairs_part:
        a, b = (s.strip() for s in pairs_part.split("<>", 1))
        pairs = [(a, b), (b, a)]
    elif ">" in pairs_part:
        a, b = (s.strip() for s in pairs_part.split(">", 1))
        pairs = [(a, b)]
    else:
        raise ImpairmentError(f"--impair {spec!r}: directions must be 'a>b', 'a<>b' or '*'")
    for name in (a, b):
        if name not in site_names:
            raise ImpairmentError(f"--impair {spec!r}: unknown site {name!r} (have {site_names})")
    return [(src, dst, imp) for src, dst in pairs]


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _run(args: argparse.Namespace, sites: SiteMap, scheduler: WanScheduler) -> int:
    loop = asyncio.get_running_loop()
    fd, dev = open_tun(args.dev)
    driver = TunDriver(loop, fd, sites, scheduler)
    driver.start()
    ready: dict[str, object] = {"event": "ready", "dev": dev, "pid": os.getpid()}
    transport = None
    if args.control:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: UdpControl(driver), local_addr=_host_port(args.control)
        )
        host, port = transport.get_extra_info("sockname")[:2]
        ready["control"] = f"{host}:{port}"
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(ready), flush=True)
    try:
        await stop.wait()
    finally:
        driver.stop()
        if transport is not None:
            transport.close()
        os.close(fd)
    summary = {
        "event": "stopped",
        "driver": asdict(driver.stats()),
        "directions": {
            f"{src}>{dst}": asdict(scheduler.stats(src, dst))
            for src, dst in sorted(scheduler.impairments())
        },
    }
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.wan", description=__doc__.split("\n")[0])
    parser.add_argument("--dev", required=True, help="TUN device name (created if missing)")
    parser.add_argument("--sites", required=True, help="site=CIDR,... (a site may repeat)")
    parser.add_argument("--impair", action="append", default=[], help="see module doc")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible runs")
    parser.add_argument("--control", default="", help="HOST:PORT for JSON-over-UDP control")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","msg":"%(message)s"}',
    )
    try:
        sites = SiteMap.parse(args.sites)
        scheduler = WanScheduler(random.Random(args.seed))
        for spec in args.impair:
            for src, dst, imp in parse_impair(spec, sites.names):
                scheduler.set_impairment(src, dst, imp)
    except ImpairmentError as exc:
        parser.error(str(exc))
    try:
        return uvloop.run(_run(args, sites, scheduler))
    except OSError as exc:
        hint = "run as root, inside the wan namespace"
        print(f"cannot open TUN device {args.dev!r}: {exc} ({hint})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
