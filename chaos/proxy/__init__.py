"""A Toxiproxy-compatible chaos proxy on asyncio (TCP, plus UDP as an extension).

Run it with ``python -m chaos.proxy --host 127.0.0.1 --port 8474`` (or the
``raftstate-toxiproxy`` script) and drive it with any Toxiproxy 2.x client,
e.g. toxiproxy-python. Modules:

* :mod:`chaos.proxy.toxics`: sans-IO toxic logic (time and randomness are inputs);
* :mod:`chaos.proxy.registry`: proxies, their toxics, API errors;
* :mod:`chaos.proxy.api`: the HTTP API;
* :mod:`chaos.proxy.tcp` / :mod:`chaos.proxy.udp`: the data paths.
"""

from chaos.proxy.api import VERSION, ApiServer
from chaos.proxy.registry import ApiError, Proxy, ProxyRegistry
from chaos.proxy.toxics import (
    Close,
    DatagramPipe,
    LossModel,
    Send,
    Stream,
    StreamPipe,
    ToxicityRoll,
    ToxicSpec,
)

__all__ = [
    "VERSION",
    "ApiError",
    "ApiServer",
    "Close",
    "DatagramPipe",
    "LossModel",
    "Proxy",
    "ProxyRegistry",
    "Send",
    "Stream",
    "StreamPipe",
    "ToxicSpec",
    "ToxicityRoll",
]
