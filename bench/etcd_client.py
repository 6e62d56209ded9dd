"""EtcdClient: a minimal etcd v3 client on grpc.aio, for the benchmark.

Why: ``raftstate bench --vs-etcd`` must measure etcd through the same client
stack as raftstate (Python, grpc.aio, one channel per endpoint, the same
channel options as :mod:`raftstate.sdk.client`), so that differences in the
numbers come from the servers, not from comparing Go's clientv3 with Python.

Theory of operation:

1. ``connect()`` asks every endpoint for ``Maintenance.Status``. Each answer
   names the member that answered (``header.member_id``) and the member it
   believes leads (``leader``); the leader's endpoint is the one whose own id
   is that leader id.
2. Every request then goes to the leader. Writes would otherwise take an extra
   follower-to-leader hop; linearizable reads on the leader need only the
   ReadIndex heartbeat round (Raft thesis §6.4), and serializable reads are
   served from the leader's local state without any round.
3. Nothing is retried: errors surface as ``grpc.aio.AioRpcError`` so that the
   benchmark counts them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from bench.etcdpb import etcd_kv_pb2, etcd_kv_pb2_grpc
from raftstate.errors import Unavailable

_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # Same as raftstate.sdk.client, so both systems see the same client stack.
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class EtcdClient:
    """A connection to an etcd cluster's leader. Create it with :meth:`connect`.

    Not thread-safe: use it only from the event loop that connected it.
    """

    def __init__(self, leader_endpoint: str, channel: grpc.aio.Channel) -> None:
        """Wrap an open ``channel`` to ``leader_endpoint``; prefer :meth:`connect`."""
        self._leader_endpoint = leader_endpoint
        self._channel = channel
        # The generated stubs are untyped; calls on them return Any.
        self._kv = etcd_kv_pb2_grpc.KVStub(channel)

    @classmethod
    async def connect(cls, endpoints: list[str], *, timeout_s: float = 5.0) -> EtcdClient:
        """Find the leader among ``endpoints`` (``host:port``) and connect to it.

        Raises ``ValueError`` if ``endpoints`` is empty, ``grpc.aio.AioRpcError``
        (the first error) if no endpoint answers within ``timeout_s``, and
        :class:`raftstate.errors.Unavailable` if the answering members know no
        leader, disagree, or the leader is not among ``endpoints``.
        """
        if not endpoints:
            raise ValueError("endpoints must name at least one etcd member")
        channels = {ep: grpc.aio.insecure_channel(ep, options=_CHANNEL_OPTIONS) for ep in endpoints}
        leader: str | None = None
        try:
            stubs = [etcd_kv_pb2_grpc.MaintenanceStub(ch) for ch in channels.values()]
            results = await asyncio.gather(
                *(s.Status(etcd_kv_pb2.StatusRequest(), timeout=timeout_s) for s in stubs),
                return_exceptions=True,
            )
            by_id: dict[int, str] = {}
            leader_ids: set[int] = set()
            errors: list[BaseException] = []
            for ep, result in zip(channels, results, strict=True):
                if isinstance(result, BaseException):
                    errors.append(result)
                    continue
                by_id[int(result.header.member_id)] = ep
                leader_ids.add(int(result.leader))
            if not by_id:
                raise errors[0]
            if len(leader_ids) != 1 or 0 in leader_ids:
                raise Unavailable(
                    f"etcd members disagree on or know no leader (leader ids {sorted(leader_ids)});"
                    " wait for the election to finish and connect again"
                )
            leader = by_id.get(leader_ids.pop())
            if leader is None:
                raise Unavailable(
                    "the etcd leader is not among the given endpoints or did not answer;"
                    " pass every member's client endpoint"
                )
            return cls(leader, channels[leader])
        finally:
            await asyncio.gather(*(ch.close() for ep, ch in channels.items() if ep != leader))

    @property
    def leader_endpoint(self) -> str:
        """The endpoint every request is sent to."""
        return self._leader_endpoint

    async def put(self, key: str, value: bytes, timeout_s: float) -> int:
        """Write ``value`` at ``key`` (UTF-8) and return the store revision of the write.

        Returns once etcd has committed and applied the write. Raises
        ``grpc.aio.AioRpcError`` on any failure, including ``DEADLINE_EXCEEDED``
        after ``timeout_s`` (the write may still be applied).
        """
        response = await self._kv.Put(
            etcd_kv_pb2.PutRequest(key=key.encode(), value=value), timeout=timeout_s
        )
        return int(response.header.revision)

    async def get(self, key: str, *, serializable: bool, timeout_s: float) -> bytes | None:
        """The value at ``key``, or ``None`` if the key does not exist.

        With ``serializable=False`` the read is linearizable; with ``True`` it
        is the leader's local state, which may miss writes acknowledged by a
        newer leader. Raises ``grpc.aio.AioRpcError`` on any failure.
        """
        response = await self._kv.Range(
            etcd_kv_pb2.RangeRequest(key=key.encode(), serializable=serializable),
            timeout=timeout_s,
        )
        if not response.kvs:
            return None
        return bytes(response.kvs[0].value)

    async def close(self) -> None:
        """Close the channel, cancelling calls in flight. Idempotent."""
        await self._channel.close()
