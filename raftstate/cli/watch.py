"""``raftstate watch``: print committed changes, one line per event, live.

Each line is ``REVISION DEVICE_ID KIND[,KIND] [online|offline seq=N K=V ...]``
(or one JSON object with ``--json``), flushed as it arrives, so the output
can be piped. The watch resumes on another endpoint after a failure without
losing or repeating an event (raftstate/sdk/watch.py); when no node retains
the revision it needs it prints what to do and exits 1. Ctrl-C ends it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any, TextIO

from raftstate.cli.argtypes import COUNT, UINT64_MAX, Integer
from raftstate.cli.clientflags import add_client_flags

KIND_NAMES = ("reported", "heartbeat", "online", "offline", "deleted")


def kinds_arg(text: str) -> list[str]:
    """``--kinds online,offline`` -> the names, each checked."""
    names = [k.strip().lower() for k in text.split(",") if k.strip()]
    bad = [k for k in names if k not in KIND_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of {', '.join(KIND_NAMES)}, got {text!r}"
        )
    return names


def add_watch_parser(sub: Any) -> None:
    w = sub.add_parser("watch", help="print committed changes, one line per event, live")
    add_client_flags(w, outer=False)
    w.add_argument("--prefix", default="", help="only device ids starting with this")
    w.add_argument(
        "--device", action="append", default=[], help="only this device id (repeat, at most 1000)"
    )
    w.add_argument(
        "--from",
        dest="start",
        type=Integer(1, UINT64_MAX),
        default=None,
        help="first revision to print (default: changes from now on)",
    )
    w.add_argument(
        "--kinds",
        type=kinds_arg,
        default=[],
        help="only these kinds: " + ",".join(KIND_NAMES) + " (default all)",
    )
    w.add_argument("--prev", action="store_true", help="also print each device's previous state")
    w.add_argument("--json", action="store_true", help="one JSON object per event")
    w.add_argument("--limit", type=COUNT, default=None, help="stop after this many events")
    w.set_defaults(fn=watch_main, client=True)


def line(event: Any) -> str:
    """One human-readable line for a ``WatchEvent``."""
    kinds = ",".join(KIND_NAMES[k - 1] for k in sorted(event.kinds))
    parts = [str(event.revision), event.device_id, kinds]
    dev = event.device
    if dev is not None:
        parts.append("online" if dev.online else "offline")
        parts.append(f"seq={dev.seq}")
        parts += [f"{k}={v}" for k, v in sorted(dev.reported.items())]
    prev = event.prev_device
    if prev is not None:
        parts.append("prev:")
        parts.append(f"seq={prev.seq}")
        parts += [f"{k}={v}" for k, v in sorted(prev.reported.items())]
    return " ".join(parts)


def as_json(event: Any) -> str:
    data = asdict(event)
    data["kinds"] = [KIND_NAMES[k - 1] for k in sorted(event.kinds)]
    return json.dumps(data)


def watch_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from raftstate.errors import RaftStateError, ResyncRequired
    from raftstate.sdk import DeviceClient, EventKind

    out = out or sys.stdout
    if args.prefix and args.device:
        print("raftstate watch: --prefix and --device cannot be combined", file=sys.stderr)
        return 2
    kinds = [EventKind(KIND_NAMES.index(k) + 1) for k in args.kinds]
    n = 0
    with DeviceClient(
        args.endpoints, deadline_s=args.deadline, credentials=args.credentials
    ) as client:
        try:
            with client.watch(
                prefix=args.prefix,
                device_ids=args.device,
                kinds=kinds,
                start_revision=args.start or 0,
                prev_device=args.prev,
            ) as watch:
                for event in watch:
                    print(as_json(event) if args.json else line(event), file=out, flush=True)
                    n += 1
                    if args.limit is not None and n >= args.limit:
                        break
        except ResyncRequired as err:
            print(
                f"raftstate watch: {err.message}; the SDK's list_then_watch does both",
                file=sys.stderr,
            )
            return 1
        except RaftStateError as err:
            print(f"raftstate watch: {type(err).__name__}: {err.message}", file=sys.stderr)
            return 1
    return 0


__all__ = ["add_watch_parser", "line", "watch_main"]
