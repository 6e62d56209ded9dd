"""CPU time of whole processes, from /proc, at nanosecond precision where possible.

``/proc/<pid>/stat`` (utime + stime) covers every thread the process ever
had, but in clock ticks (10 ms). ``/proc/<pid>/schedstat`` is in nanoseconds
but covers only the main thread, so :func:`sample` reads
``/proc/<pid>/task/<tid>/schedstat`` for every live thread and keeps the
tick count alongside. :func:`cpu_between` uses the nanosecond sum unless a
thread vanished between the two samples or the tick count ran measurably
ahead of it (a thread lived and died inside the window): the ticks then are
the only complete account. Linux only; other systems read as "no sample".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Allowed lead of the tick count over the schedstat sum before the ticks are
#: taken as the truth: two ticks of rounding plus 2 %.
_TICK_SLACK = 2


@dataclass(frozen=True, slots=True)
class CpuSample:
    """One process at one moment: nanoseconds on a CPU per live thread id,
    and utime + stime in clock ticks for the whole process."""

    threads_ns: dict[int, int]
    ticks: int


@dataclass(frozen=True, slots=True)
class CpuDelta:
    """CPU seconds between two samples and where they came from:
    ``"schedstat"`` (ns, per thread) or ``"stat"`` (clock ticks)."""

    seconds: float
    source: str


def sample(pid: int) -> CpuSample | None:
    """The process's CPU counters now, or ``None`` if it is gone (or this is
    not Linux). Never raises."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        tids = os.listdir(f"/proc/{pid}/task")
    except (OSError, IndexError, ValueError):
        return None
    threads: dict[int, int] = {}
    for tid in tids:
        try:
            threads[int(tid)] = int(
                Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0]
            )
        except (OSError, IndexError, ValueError):
            continue  # the thread exited while we listed; the ticks still count it
    return CpuSample(threads, ticks)


def cpu_between(before: CpuSample | None, after: CpuSample | None) -> CpuDelta:
    """CPU the process used from ``before`` to ``after`` (see the module
    docstring for the choice of source). Zero from ``"none"`` if either
    sample is missing. Pure."""
    if before is None or after is None:
        return CpuDelta(0.0, "none")
    tick_s = (after.ticks - before.ticks) / CLK_TCK
    vanished = any(tid not in after.threads_ns for tid in before.threads_ns)
    ns = sum(v - before.threads_ns.get(tid, 0) for tid, v in after.threads_ns.items())
    sched_s = ns / 1e9
    if vanished or tick_s > sched_s * 1.02 + _TICK_SLACK / CLK_TCK:
        return CpuDelta(tick_s, "stat")
    return CpuDelta(sched_s, "schedstat")


def busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy since boot (/proc/stat);
    0.0 where that is unreadable."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


__all__ = ["CLK_TCK", "CpuDelta", "CpuSample", "busy_cpu_seconds", "cpu_between", "sample"]
