"""The standard gRPC server metrics, recorded by a ``grpc.aio`` interceptor.

Theory of operation
-------------------
Names and labels follow go-grpc-prometheus (the ones Grafana dashboards
for gRPC services already use):

* ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
* ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``
* ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}``
  (a histogram; for a stream, its whole life)

``grpc_code`` is the Go name of the status (``OK``, ``Unavailable``,
``PermissionDenied``, ...). :class:`GrpcMetricsInterceptor` wraps each
method handler once (the wrapped handler is cached per method, so a call
costs a dict lookup, two clock reads, one ``bisect`` and a few additions;
nothing is locked and no label set is built per call). The status is the
one the handler set (``context.abort``/``set_code``), ``OK`` when it
returned normally, ``Cancelled`` when the call was cancelled and
``Unknown`` for anything else it raised (what gRPC answers then).

Label cardinality is bounded: only methods the server registered get
their own labels; calls to any other method (gRPC answers UNIMPLEMENTED)
are counted under ``grpc_service="unknown", grpc_method="unknown"``.

Recording happens on the event loop; :meth:`GrpcMetrics.samples` may be
called from any thread (it copies the dicts first).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from raftstate.histogram import LATENCY_BUCKETS_S, Histogram, HistogramSnapshot

#: gRPC status -> the name Go (and so go-grpc-prometheus) gives it.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
#: Enum member access is slow on Python 3.11; the per-call path uses these.
_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
UNKNOWN_METHOD = ("unknown", "unknown")


@dataclass(frozen=True, slots=True)
class MethodKey:
    """The labels of one method: ``grpc_type``, ``grpc_service``, ``grpc_method``."""

    type: str
    service: str
    method: str


def split_method(full: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")``; anything
    else -> ``("unknown", "unknown")``."""
    service, sep, method = full.lstrip("/").rpartition("/")
    return (service, method) if sep and service and method else UNKNOWN_METHOD


def rpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """go-grpc-prometheus's ``grpc_type`` label."""
    if request_streaming and response_streaming:
        return "bidi_stream"
    if request_streaming:
        return "client_stream"
    return "server_stream" if response_streaming else "unary"


def status_of(code: Any) -> grpc.StatusCode:
    """A status from what ``context.code()`` returns (a ``StatusCode``, its
    number, or ``None`` for "not set": OK)."""
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


class MethodStats:
    """The counters of one method: calls started, calls that ended OK, other
    codes, and the handling-time histogram. Held by the wrapped handler, so a
    call touches no dict on the OK path."""

    __slots__ = ("key", "started", "ok", "codes", "handling")

    def __init__(self, key: MethodKey, buckets: tuple[float, ...]) -> None:
        self.key = key
        self.started = 0
        self.ok = 0
        self.codes: dict[grpc.StatusCode, int] = {}
        self.handling = Histogram(buckets)

    def end(self, code: Any, seconds: float) -> None:
        """One call ended with ``code`` (what ``context.code()`` gave, or a
        ``StatusCode``) after ``seconds``."""
        if code is None or code is _OK or code == 0:
            self.ok += 1
        else:
            status = status_of(code)
            self.codes[status] = self.codes.get(status, 0) + 1
        self.handling.observe(seconds)


class GrpcMetrics:
    """Counters and handling-time histograms per method (and code). Written
    on the event loop only."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self._buckets = buckets
        self.methods: dict[MethodKey, MethodStats] = {}

    def stats_for(self, key: MethodKey) -> MethodStats:
        """The (one) counters of ``key``, made on first use."""
        stats = self.methods.get(key)
        if stats is None:
            stats = self.methods[key] = MethodStats(key, self._buckets)
        return stats

    def on_start(self, key: MethodKey) -> None:
        self.stats_for(key).started += 1

    def on_end(self, key: MethodKey, code: grpc.StatusCode, seconds: float) -> None:
        self.stats_for(key).end(code, seconds)

    def samples(
        self,
    ) -> tuple[
        list[tuple[MethodKey, int]],
        list[tuple[MethodKey, str, int]],
        list[tuple[MethodKey, HistogramSnapshot]],
    ]:
        """Copies for a scrape: started, handled (with the Go code name) and
        handling-time snapshots. Any thread."""
        methods = list(self.methods.values())
        started = [(m.key, m.started) for m in methods]
        handled: list[tuple[MethodKey, str, int]] = []
        for m in methods:
            if m.ok:
                handled.append((m.key, "OK", m.ok))
            for code, n in list(m.codes.items()):
                handled.append((m.key, GO_CODE_NAMES.get(code, "Unknown"), n))
        return started, handled, [(m.key, m.handling.snapshot()) for m in methods]


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Records :class:`GrpcMetrics` for every call (module docstring)."""

    def __init__(self, metrics: GrpcMetrics, clock: Callable[[], float] = time.perf_counter):
        self.metrics = metrics
        self._clock = clock
        #: method -> (the handler grpc found, our wrapper of it)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            key = MethodKey("unary", *UNKNOWN_METHOD)
            self.metrics.on_start(key)
            self.metrics.on_end(key, grpc.StatusCode.UNIMPLEMENTED, 0.0)
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        key = MethodKey(rpc_type(h.request_streaming, h.response_streaming), *split_method(method))
        behavior: Any
        make: Callable[..., grpc.RpcMethodHandler]
        if h.unary_unary is not None:
            behavior, make = h.unary_unary, grpc.unary_unary_rpc_method_handler
        elif h.unary_stream is not None:
            behavior, make = h.unary_stream, grpc.unary_stream_rpc_method_handler
        elif h.stream_unary is not None:
            behavior, make = h.stream_unary, grpc.stream_unary_rpc_method_handler
        else:
            behavior, make = h.stream_stream, grpc.stream_stream_rpc_method_handler
        if inspect.isasyncgenfunction(behavior):
            wrapped = self._generator(key, behavior)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._coroutine(key, behavior)
        else:
            return h  # a synchronous stub (e.g. generated UNIMPLEMENTED): not ours to time
        return make(
            wrapped,
            request_deserializer=h.request_deserializer,
            response_serializer=h.response_serializer,
        )

    def _coroutine(self, key: MethodKey, behavior: Callable[..., Any]) -> Callable[..., Any]:
        stats, clock = self.metrics.stats_for(key), self._clock

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            stats.started += 1
            started = clock()
            code: Any = _UNKNOWN
            try:
                result = await behavior(request, context)
                code = context.code()
                return result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _raised_status(context)
                raise
            finally:
                stats.end(code, clock() - started)

        return handler

    def _generator(self, key: MethodKey, behavior: Callable[..., Any]) -> Callable[..., Any]:
        stats, clock = self.metrics.stats_for(key), self._clock

        async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            stats.started += 1
            started = clock()
            code: Any = _UNKNOWN
            try:
                async for response in behavior(request, context):
                    yield response
                code = context.code()
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = _raised_status(context)
                raise
            finally:
                stats.end(code, clock() - started)

        return handler


def _raised_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a handler that raised: the code ``abort`` set, else
    UNKNOWN (what gRPC answers for an exception)."""
    code = status_of(context.code())
    return grpc.StatusCode.UNKNOWN if code is grpc.StatusCode.OK else code


__all__ = [
    "GO_CODE_NAMES",
    "GrpcMetrics",
    "GrpcMetricsInterceptor",
    "MethodKey",
    "MethodStats",
    "rpc_type",
    "split_method",
    "status_of",
]
