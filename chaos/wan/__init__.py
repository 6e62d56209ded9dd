"""Userspace layer-3 WAN emulator: per-direction, per-site-pair impairment via a TUN device.

The kernel has no ``netem`` here, so inter-site traffic is routed through a TUN
device in a "wan" namespace and a uvloop process delays, drops, duplicates,
reorders and rate-limits it. Because it works on IP packets, TCP, UDP and ICMP
get identical impairment. Modules:

* :mod:`chaos.wan.scheduler`: sans-IO core (time and randomness are inputs);
* :mod:`chaos.wan.tun`: the TUN device, its uvloop driver and a JSON-over-UDP control;
* ``python -m chaos.wan --help``: the runnable emulator.
"""

from chaos.wan.scheduler import (
    DirectionStats,
    Impairment,
    ImpairmentError,
    SiteMap,
    WanScheduler,
    ipv4_addresses,
)

__all__ = [
    "DirectionStats",
    "Impairment",
    "ImpairmentError",
    "SiteMap",
    "WanScheduler",
    "ipv4_addresses",
]
