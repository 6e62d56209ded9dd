"""``raftstate lab``: a raftstate cluster across NATed sites and an emulated WAN, on this host.

* ``lab up``: build the WAN lab (:mod:`cluster.natlab`), start a node per
  site (:mod:`cluster.labcluster`), print how to reach everything, and return;
  the lab keeps running. State goes to ``--dir``/``lab.json``.
* ``lab impair``: change the WAN's impairment at runtime (a profile from
  ``chaos/profiles.toml``, or single directions).
* ``lab status``: the lab's processes and the WAN's counters.
* ``lab down``: stop the processes recorded in the state, then remove the
  namespaces; idempotent, and works after a crashed ``up``.

Everything needs root (namespaces, nftables, a TUN device). Exit codes: 0 ok,
1 the lab failed, 2 a usage or environment problem.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raftstate.cli.argtypes import COUNT, RATE, SECONDS, SECONDS_OR_ZERO, Integer
from raftstate.cli.words import plural
from raftstate.model import REPORTED_MAX_BYTES

if TYPE_CHECKING:
    from cluster.labcluster import LabCluster, LabState

DEFAULT_DIR = ".raftstate/lab"
STATE_FILE = "lab.json"


def add_lab_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``raftstate lab`` and its subcommands on ``sub``."""
    lab = sub.add_parser("lab", help="NATed sites behind an emulated WAN, on this host (root)")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)

    up = lsub.add_parser("up", help="build the lab, start a cluster in it, return")
    up.add_argument("--sites", type=Integer(1, 200), default=3,
                    help="sites, one node each, 1-200 (default 3)")  # fmt: skip
    up.add_argument(
        "--symmetric",
        default="",
        metavar="I[,J...]",
        help="sites (1-based) behind symmetric NATs; the others are cone NATs",
    )
    up.add_argument("--profile", default=None, help="WAN profile from chaos/profiles.toml")
    up.add_argument("--transport", choices=["udp", "tcp"], default="udp",
                    help="udp: ICE through the rendezvous (default); tcp: pysyncobj TCP "
                    "through router port forwards")  # fmt: skip
    up.add_argument("--prefix", default=None, help="namespace name prefix (default random)")
    up.add_argument("--timeout", type=SECONDS, default=90.0, help="seconds to wait for a leader")
    up.set_defaults(fn=cmd_lab_up)

    imp = lsub.add_parser("impair", help="change the WAN's impairment of a running lab")
    imp.add_argument("--profile", default=None, help="apply this profile to every direction")
    imp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SPEC",
        help="one direction, as python -m chaos.wan's --impair: 's1>s2:delay_ms=40', "
        "'s1<>pub:loss=0.1', '*:' (sites s1..sN and pub; later wins)",
    )
    imp.set_defaults(fn=cmd_lab_impair)

    st = lsub.add_parser("status", help="the lab's processes and WAN counters")
    st.set_defaults(fn=cmd_lab_status)

    down = lsub.add_parser("down", help="stop everything the lab started and remove it")
    down.set_defaults(fn=cmd_lab_down)

    bench = lsub.add_parser(
        "bench", help="headline benchmark: heartbeat latency per profile, UDP/ICE vs TCP vs etcd"
    )
    bench.add_argument("--profile", default="lan,wan,weak,bad",
                       help="profiles, comma-separated (default lan,wan,weak,bad)")  # fmt: skip
    bench.add_argument("--systems", default="udp,tcp,etcd",
                       help="systems: udp (raftstate, ICE), tcp (raftstate, pysyncobj TCP "
                       "through DNAT), etcd (default all three)")  # fmt: skip
    bench.add_argument("--heartbeats", type=COUNT, default=3000,
                       help="heartbeats per (profile, system), all sites together")  # fmt: skip
    bench.add_argument("--rate", type=RATE, default=100.0,
                       help="heartbeats/s offered in total, open loop, split over "
                       "the sites")  # fmt: skip
    bench.add_argument("--deadline", type=SECONDS, default=5.0, help="per-heartbeat deadline, s")
    bench.add_argument("--warmup", type=SECONDS_OR_ZERO, default=5.0,
                       help="seconds of load after each profile change, not measured "
                       "(default 5)")  # fmt: skip
    bench.add_argument("--state-bytes", type=Integer(0, REPORTED_MAX_BYTES - 64), default=0,
                       help="each heartbeat reports a field of 0..N bytes, uniform (default "
                       "0: a tiny map)")  # fmt: skip
    bench.add_argument("--symmetric", default="", metavar="I[,J...]",
                       help="sites behind symmetric NATs (UDP then relays through "
                       "TURN)")  # fmt: skip
    bench.add_argument("--nat-event", choices=["flush", "remap"], default=None,
                       help="mid-window conntrack flush (or remap) on site 3, raftstate "
                       "systems; reports the replication stall")  # fmt: skip
    bench.add_argument("--quick", action="store_true",
                       help="smoke test: 300 heartbeats at 100/s unless given")  # fmt: skip
    bench.add_argument("--out", default=None,
                       help="output stem: writes STEM.json, STEM.md, STEM.png "
                       "(default DIR/labbench)")  # fmt: skip
    bench.set_defaults(fn=cmd_lab_bench)

    rejoin = lsub.add_parser(
        "rejoin", help="a follower catches up over a rate-capped link while devices keep sending"
    )
    rejoin.add_argument("--missed", type=COUNT, default=50_000,
                        help="heartbeats committed while the follower is down")  # fmt: skip
    rejoin.add_argument("--rate", type=RATE, default=300.0,
                        help="heartbeats/s from the two live sites' devices")  # fmt: skip
    rejoin.add_argument("--profile", default="weak", help="WAN profile (default weak)")
    rejoin.add_argument("--rate-kbit", type=RATE, default=2000.0,
                        help="leader <-> follower bottleneck, kbit/s (default 2000)")  # fmt: skip
    rejoin.add_argument("--queue-ms", type=RATE, default=1000.0,
                        help="the bottleneck's buffer, ms (default 1000)")  # fmt: skip
    rejoin.add_argument("--window", type=SECONDS, default=60.0,
                        help="seconds of load after the restart (catch-up must end in it)")
    rejoin.add_argument("--ab", type=int, default=0, metavar="N",
                        help="N rounds of congestion control on, then off (alternated)")
    rejoin.add_argument("--out", default=None,
                        help="output stem: writes STEM.json (default DIR/rejoin)")
    rejoin.set_defaults(fn=cmd_lab_rejoin)

    probe = lsub.add_parser(
        "probe", help="the WAN emulator's accuracy and capacity, measured with ping and iperf3"
    )
    probe.add_argument("--quick", action="store_true", help="short probes (a smoke test)")
    probe.add_argument(
        "--out", default=None, help="output stem: writes STEM.json, STEM.md (default DIR/labprobe)"
    )
    probe.set_defaults(fn=cmd_lab_probe)

    for p in (up, imp):
        p.add_argument("--pub-legs", choices=["split", "full"], default="split",
                       help="site<->pub legs get half the profile (split: a TURN-relayed "
                       "path then matches a direct one) or all of it (full)")  # fmt: skip
    for p in (up, imp, st, down, bench, rejoin, probe):
        p.add_argument("--dir", default=DEFAULT_DIR, help=f"state and logs (default {DEFAULT_DIR})")


def _unwind_on_sigterm() -> None:
    """``kill PID`` of a bench or probe must still tear its lab down: turn
    SIGTERM into ``SystemExit`` so every ``with`` block unwinds (processes
    stopped, namespaces removed), as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))


def _fail(cmd: str, message: str, code: int = 2) -> int:
    print(f"raftstate lab {cmd}: {message}", file=sys.stderr)
    return code


def _environment_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, nftables, a TUN device); run it with sudo"
    from cluster.natlab import available

    reason = available()
    return None if reason is None else f"cannot build a lab here: {reason}"


def _state_path(args: argparse.Namespace) -> Path:
    return Path(args.dir) / STATE_FILE


def _load_state(args: argparse.Namespace) -> LabState | None:
    from cluster.labcluster import LabState

    path = _state_path(args)
    if not path.exists():
        return None
    return LabState.from_json(path.read_text())


def cmd_lab_up(args: argparse.Namespace) -> int:
    from chaos.profiles import ProfileError, load_profile
    from cluster.labcluster import GRPC_PORT, LabCluster, LabState
    from cluster.netns import LabError

    problem = _environment_problem()
    if problem:
        return _fail("up", problem)
    path = _state_path(args)
    if path.exists():
        return _fail("up", f"{path} exists: a lab may be up; run `raftstate lab down --dir "
                     f"{args.dir}` first (it is idempotent)")  # fmt: skip
    if not 1 <= args.sites <= 200:
        return _fail("up", f"--sites must be in 1..200, got {args.sites}")
    try:
        symmetric = {int(s) for s in args.symmetric.split(",") if s.strip()}
    except ValueError:
        return _fail("up", f"--symmetric takes site numbers like 3 or 2,3, got {args.symmetric!r}")
    if not symmetric <= set(range(1, args.sites + 1)):
        return _fail("up", f"--symmetric sites must be in 1..{args.sites}, got {sorted(symmetric)}")
    if args.profile is not None:
        try:
            load_profile(args.profile)
        except ProfileError as err:
            return _fail("up", str(err))
    kinds = ["symmetric" if i in symmetric else "cone" for i in range(1, args.sites + 1)]
    prefix = args.prefix or "lab" + secrets.token_hex(2)
    started = time.monotonic()
    try:
        lab = LabCluster(
            args.dir, kinds, transport=args.transport, profile=args.profile,
            pub_legs=args.pub_legs, prefix=prefix, detach=True,
            progress=lambda line: print(line, flush=True),
        )  # fmt: skip
    except ValueError as err:  # e.g. a --prefix that cannot name namespaces
        return _fail("up", str(err))
    # Recorded before anything is built, so `lab down` can clean up a crashed `up`.
    LabState(prefix, tuple(kinds), args.transport, args.profile).save(path)
    try:
        leader = lab.up(timeout_s=args.timeout)
    except (LabError, RuntimeError, TimeoutError, ValueError, OSError) as err:
        path.unlink(missing_ok=True)
        return _fail("up", f"{err} (everything it started was stopped and removed)", 1)
    state = lab.state()
    state.save(path)
    _print_guide(lab, state, args)
    print(
        f"lab {prefix} is up in {time.monotonic() - started:.1f}s: "
        f"{plural(args.sites, 'node')} over "
        f"{args.transport}, leader {leader}, profile {args.profile or 'none'}, "
        f"gRPC port {GRPC_PORT}; state in {path}"
    )
    return 0


def _print_guide(lab: LabCluster, state: LabState, args: argparse.Namespace) -> None:
    natlab = lab.lab
    print(f"\n  {'site':<5}{'NAT':<11}{'node gRPC (from this host)':<28}"
          f"{'node ns':<14}{'device ns':<14}router ns")  # fmt: skip
    for site in state.sites:
        print(
            f"  {site['site']:<5}{site['kind']:<11}{site['grpc']:<28}"
            f"{site['node_netns']:<14}{site['device_netns']:<14}{site['router_netns']}"
        )
    print(
        f"  public ns {natlab.public_netns}: coturn {natlab.stun_address}"
        + (f", rendezvous {lab.rendezvous_address}" if state.transport == "udp" else "")
        + f", WAN emulator pid {natlab.wan_pid}\n"
    )
    first = state.sites[0]
    if lab.cluster is not None and lab.cluster.pki is not None:
        env = lab.cluster.client_env()
        print(f"  export RAFTSTATE_CA={env['RAFTSTATE_CA']}")
        print(f"  export RAFTSTATE_TOKEN={env['RAFTSTATE_TOKEN']}")
        print("  # (TLS + auth: the CA above and an admin token valid for 24 h)")
    print(f"  raftstate status --endpoints {','.join(state.endpoints)}")
    print(f"  ip netns exec {first['device_netns']} bash    # a shell among site 1's devices;")
    print(f"      # its node is {first['grpc_local']}, the others at their router addresses")
    print(f"  ip netns exec {first['node_netns']} bash      # site 1's node namespace")
    print(f"  raftstate lab impair --profile bad --dir {args.dir}")
    print(f"  raftstate lab down --dir {args.dir}\n")


def cmd_lab_impair(args: argparse.Namespace) -> int:
    import dataclasses

    from chaos.profiles import ProfileError, load_profile
    from chaos.wan import ImpairmentError
    from chaos.wan.__main__ import parse_impair
    from cluster.wancontrol import WanControl
    from cluster.wanlab import PUB, plan_profile, site_name

    problem = _environment_problem()
    if problem:
        return _fail("impair", problem)
    if args.profile is None and not args.set:
        return _fail("impair", "give --profile NAME and/or --set SPEC")
    state = _load_state(args)
    if state is None or state.wan_control_port is None:
        return _fail("impair", f"no running lab in {args.dir} (start one with `raftstate lab up`)")
    names = [site_name(i) for i in range(1, len(state.kinds) + 1)] + [PUB]
    try:
        plan = {}
        if args.profile is not None:
            profile = load_profile(args.profile)
            plan.update(plan_profile(profile, len(state.kinds), pub_legs=args.pub_legs))
            if profile.schedule:
                print(f"note: {args.profile}'s outage schedule is not run by the lab")
        for spec in args.set:
            plan.update({(s, d): imp for s, d, imp in parse_impair(spec, names)})
        control = WanControl(f"{state.prefix}-pub", state.wan_control_port)
        try:
            control.apply(plan)
        finally:
            control.close()
    except (ProfileError, ImpairmentError, ValueError) as err:
        return _fail("impair", str(err))
    except OSError as err:
        return _fail("impair", f"{err}; is the lab up? (`raftstate lab status`)", 1)
    if args.profile is not None:
        dataclasses.replace(state, profile=args.profile).save(_state_path(args))
    what = f"profile {args.profile}" if args.profile else "the given directions"
    print(f"lab {state.prefix}: {len(plan)} WAN directions set from {what}")
    return 0


def cmd_lab_status(args: argparse.Namespace) -> int:
    from cluster.wancontrol import WanControl

    problem = _environment_problem()
    if problem:
        return _fail("status", problem)
    state = _load_state(args)
    if state is None:
        return _fail("status", f"no lab state in {args.dir}", 1)
    alive = [p for p in state.processes if p.alive()]
    print(f"lab {state.prefix}: {plural(len(state.kinds), 'site')} ({', '.join(state.kinds)}), "
          f"{state.transport}, profile {state.profile or 'none'}")  # fmt: skip
    for p in state.processes:
        print(f"  {p.name:<11} pid {p.pid:<8} {'running' if p in alive else 'GONE'}")
    if state.wan_control_port is not None and any(p.name == "wan" for p in alive):
        control = WanControl(f"{state.prefix}-pub", state.wan_control_port)
        try:
            stats = control.stats()
        except OSError as err:
            return _fail("status", str(err), 1)
        finally:
            control.close()
        print(f"\n  {'direction':<11}{'delay':>7}{'jitter':>7}{'loss':>7}{'packets':>9}"
              f"{'lost':>7}{'black':>7}")  # fmt: skip
        for d in stats.directions:
            imp, st = d.impairment, d.stats
            print(
                f"  {d.src + '>' + d.dst:<11}{imp.delay_ms:>7.1f}{imp.jitter_ms:>7.1f}"
                f"{imp.loss:>7.1%}{st.submitted:>9}{st.lost:>7}{st.blackholed:>7}"
            )
    print(f"{len(alive)}/{plural(len(state.processes), 'process', 'processes')} running; "
          f"endpoints {','.join(state.endpoints) or '-'}")  # fmt: skip
    return 0 if len(alive) == len(state.processes) else 1


def cmd_lab_down(args: argparse.Namespace) -> int:
    from cluster.labcluster import teardown
    from cluster.netns import LabError

    if os.geteuid() != 0:
        return _fail("down", "needs root (network namespaces); run it with sudo")
    path = _state_path(args)
    try:
        state = _load_state(args)
    except (ValueError, KeyError, TypeError) as err:
        return _fail("down", f"{path} is unreadable ({err}); remove the lab's namespaces "
                     "by hand (`ip netns list`) and delete the file")  # fmt: skip
    if state is None:
        print(f"no lab state in {args.dir}; nothing to do")
        return 0
    started = time.monotonic()
    try:
        stopped = teardown(state)
    except LabError as err:
        return _fail("down", str(err), 1)
    path.unlink(missing_ok=True)
    names = f" ({', '.join(stopped)})" if stopped else ""
    print(
        f"lab {state.prefix} removed in {time.monotonic() - started:.1f}s: stopped "
        f"{plural(len(stopped), 'process', 'processes')}{names}; logs kept in {args.dir}"
    )
    return 0


def cmd_lab_bench(args: argparse.Namespace) -> int:
    from chaos.labbench import PROFILES, SYSTEMS, BenchConfig, run, write_outputs
    from chaos.profiles import ProfileError, load_profile
    from cluster.netns import LabError

    problem = _environment_problem()
    if problem:
        return _fail("bench", problem)
    profiles = [p.strip() for p in args.profile.split(",") if p.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        return _fail("bench", f"--systems takes {','.join(SYSTEMS)}, got {args.systems!r}")
    try:
        for p in profiles:
            load_profile(p)
    except ProfileError as err:
        return _fail("bench", f"{err} (the lab's usual ones: {','.join(PROFILES)})")
    try:
        symmetric = [int(s) for s in args.symmetric.split(",") if s.strip()]
    except ValueError:
        return _fail("bench", f"--symmetric takes site numbers like 3, got {args.symmetric!r}")
    if not set(symmetric) <= {1, 2, 3}:
        return _fail("bench", f"--symmetric sites must be in 1..3, got {symmetric}")
    heartbeats = args.heartbeats
    if args.quick and "--heartbeats" not in sys.argv:
        heartbeats = 300
    if heartbeats < 3 or args.rate <= 0 or args.deadline <= 0:
        return _fail("bench", "--heartbeats must be >= 3, --rate and --deadline > 0")
    cfg = BenchConfig(
        profiles=profiles, systems=systems, heartbeats=heartbeats, rate=args.rate,
        deadline_s=args.deadline, warmup_s=max(0.0, args.warmup),
        symmetric=symmetric, nat_event=args.nat_event, state_bytes=args.state_bytes,
        out_dir=Path(args.dir) / "bench",
    )  # fmt: skip
    stem = Path(args.out) if args.out else Path(args.dir) / "labbench"
    _unwind_on_sigterm()
    try:
        results = run(cfg, progress=lambda line: print(line, flush=True))
    except (LabError, RuntimeError, TimeoutError, OSError) as err:
        return _fail("bench", f"{type(err).__name__}: {err}", 1)
    command = "raftstate lab bench " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["lab", "bench"]
                                                else [])  # fmt: skip
    for line in write_outputs(results, cfg, stem, command.strip()):
        print(line)
    return 0


def cmd_lab_rejoin(args: argparse.Namespace) -> int:
    from chaos.profiles import ProfileError, load_profile
    from chaos.rejoinbench import RejoinConfig, run, write_outputs
    from cluster.netns import LabError

    problem = _environment_problem()
    if problem:
        return _fail("rejoin", problem)
    try:
        load_profile(args.profile)
    except ProfileError as err:
        return _fail("rejoin", str(err))
    if args.ab < 0:
        return _fail("rejoin", f"--ab must be >= 0, got {args.ab}")
    variants = [True, False] * args.ab if args.ab else [True]
    cfg = RejoinConfig(
        missed=args.missed, rate=args.rate, profile=args.profile, rate_kbit=args.rate_kbit,
        queue_limit_ms=args.queue_ms, window_s=args.window, variants=variants,
        out_dir=Path(args.dir) / "rejoin",
    )  # fmt: skip
    stem = Path(args.out) if args.out else Path(args.dir) / "rejoin"
    _unwind_on_sigterm()
    try:
        results = run(cfg, progress=lambda line: print(line, flush=True))
    except (LabError, RuntimeError, TimeoutError, OSError) as err:
        return _fail("rejoin", f"{type(err).__name__}: {err}", 1)
    command = "raftstate lab rejoin " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["lab", "rejoin"]
                                                 else [])  # fmt: skip
    print(write_outputs(results, cfg, stem, command.strip()))
    print(f"wrote {stem}.json")
    return 0


def cmd_lab_probe(args: argparse.Namespace) -> int:
    from chaos.labprobe import run, write_outputs
    from cluster.netns import LabError

    problem = _environment_problem()
    if problem:
        return _fail("probe", problem)
    stem = Path(args.out) if args.out else Path(args.dir) / "labprobe"
    _unwind_on_sigterm()
    try:
        result = run(quick=args.quick, progress=lambda line: print(line, flush=True))
    except (LabError, RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        return _fail("probe", f"{type(err).__name__}: {err}", 1)
    for line in write_outputs(result, stem):
        print(line)
    return 0
