"""The gRPC admission layer: limits and decoding in front of every handler.

Theory of operation
-------------------
grpc.aio decodes a request *before* the handler runs, and a decoder that
raises is reported as ``UNKNOWN`` with a logged traceback per request; its
``maximum_concurrent_rpcs`` refuses without saying which limit. So services
are registered through :func:`add_guarded`, which wraps each method handler:

1. The wrapped handler receives the raw request bytes (no deserializer).
   When an :class:`~raftstate.authn.Authenticator` is given (``auth =
   "required"``), the caller is authenticated first, from metadata and the
   TLS session only: no credential, or a bad one, answers
   ``UNAUTHENTICATED`` before a byte of the request is decoded. Health
   methods are public. The identity goes into ``CURRENT_IDENTITY``.
2. Before anything else it enters a :class:`~raftstate.admission.Gate`:
   ``max_concurrent_rpcs`` for unary calls, ``max_concurrent_batch_rpcs``
   for ``HeartbeatBatch``, ``watch_max_watchers`` for ``Watch``,
   ``max_streams`` for other streaming ones. A full gate
   answers ``RESOURCE_EXHAUSTED`` naming the limit; the request is not
   decoded and nothing is kept.
3. A request (or stream message) larger than its method's byte limit
   (:func:`raftstate.admission.request_byte_limit`) answers
   ``RESOURCE_EXHAUSTED`` naming the limit, undecoded.
   It decodes the bytes itself. Bytes that are not the request message
   (corrupt wire format, a string that is not UTF-8) answer
   ``INVALID_ARGUMENT`` naming the message type and the decoder's reason.
   On a stream, messages already received are still answered, in order,
   before the stream ends with that status.
   A decoded unary request is then authorized (:func:`raftstate.authz.authorize`
   with the request's ``device_id``, if it has one): ``PERMISSION_DENIED``
   otherwise. Streamed requests are authorized per message by the handler
   (each denied message gets its own PERMISSION_DENIED ack; the stream goes
   on); ``HeartbeatBatch`` has its role checked here and each item's device
   id by the handler (a per-item PERMISSION_DENIED ack).
4. Refusals (UNAUTHENTICATED and PERMISSION_DENIED included) are logged
   through one :class:`~raftstate.ratelog.LogThrottle`:
   one line per method and kind per interval, with a count of those held
   back, whatever the client sends.
5. The gate is left when the call ends, however it ends.

Requests over ``MAX_BATCH_REQUEST_BYTES`` never get this far: the server's
``grpc.max_receive_message_length`` refuses them.
Handlers that are not coroutines or async generators (e.g. a generated
"unimplemented" stub) are registered unchanged.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from raftstate.admission import BATCH_METHOD, WATCH_METHOD, Gate, request_byte_limit
from raftstate.authn import CURRENT_IDENTITY, Authenticator
from raftstate.authz import Access, Identity, authorize, method_access
from raftstate.errors import (
    InvalidArgument,
    PermissionDenied,
    RaftStateError,
    ResourceExhausted,
    Unauthenticated,
)
from raftstate.ratelog import LogThrottle, held_suffix
from raftstate.richstatus import trailing_metadata

log = logging.getLogger("raftstate.rpcguard")

#: One refusal line per method and kind per this many seconds.
REFUSAL_LOG_INTERVAL_S = 10.0

AddFn = Callable[[Any, Any], None]


class _Capture:
    """Stands in for the server while a generated ``add_*_to_server`` runs,
    keeping the method handlers it registers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = handlers


class RpcGuard:
    """Admission for one server: two gates and the refusal log. Event-loop only."""

    def __init__(
        self,
        *,
        max_concurrent_rpcs: int,
        max_streams: int,
        clock: Callable[[], float] = time.monotonic,
        authenticator: Authenticator | None = None,
        max_concurrent_batch_rpcs: int = 32,
        max_watchers: int = 10_000,
    ) -> None:
        self.unary = Gate("max_concurrent_rpcs", max_concurrent_rpcs, "concurrent unary RPCs")
        self.streams = Gate("max_streams", max_streams, "open streams")
        self.batches = Gate(
            "max_concurrent_batch_rpcs", max_concurrent_batch_rpcs, "HeartbeatBatch calls"
        )
        self.watches = Gate("watch_max_watchers", max_watchers, "Watch streams")
        self.oversized = 0
        self.bad_requests = 0
        self.unauthenticated = 0
        self.denied = 0
        self.authenticator = authenticator
        self._throttle = LogThrottle(REFUSAL_LOG_INTERVAL_S)
        self._clock = clock

    def add_guarded(self, server: Any, add: AddFn, servicer: Any) -> None:
        """Register ``servicer`` on ``server`` the way the generated ``add``
        function would, with every async handler wrapped (module docstring)."""
        capture = _Capture()
        add(servicer, capture)
        for service, handlers in capture.services.items():
            wrapped = {name: self._wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
            generic = grpc.method_handlers_generic_handler(service, wrapped)
            # Generic handlers only, not also ``add_registered_method_handlers``:
            # grpc.aio's server keeps one pending request-call per registered
            # method and runs ``asyncio.wait`` over all of them (15 futures
            # for our services) for every call it accepts; with the generic
            # handler alone that is one. The generic lookup is a dict hit.
            server.add_generic_rpc_handlers((generic,))

    # ---- wrapping -------------------------------------------------------------

    def _wrap(self, method: str, h: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        decode = h.request_deserializer
        if decode is None:
            return h
        streaming = h.request_streaming or h.response_streaming
        gate = self.streams if streaming else self.unary
        if method == BATCH_METHOD:
            gate = self.batches
        elif method == WATCH_METHOD:
            gate = self.watches
        if h.unary_unary is not None:
            behavior = h.unary_unary
        elif h.unary_stream is not None:
            behavior = h.unary_stream
        elif h.stream_stream is not None:
            behavior = h.stream_stream
        else:
            return h  # stream-unary: we have none
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return h
        parse = self._parser(method, decode)
        make: Callable[..., grpc.RpcMethodHandler]
        request_of: Callable[[Any], Any]
        if h.request_streaming:
            make = grpc.stream_stream_rpc_method_handler

            def request_of(raw: Any) -> Any:
                return _decoded(raw, parse)

        else:
            make = (
                grpc.unary_stream_rpc_method_handler
                if h.response_streaming
                else grpc.unary_unary_rpc_method_handler
            )
            request_of = parse
        handler: Callable[..., Any]
        if inspect.isasyncgenfunction(behavior):
            handler = self._generator(method, gate, behavior, request_of, h.request_streaming)
        else:
            handler = self._coroutine(method, gate, behavior, request_of)
        return make(
            handler,
            request_deserializer=None,
            response_serializer=_bytes_or(h.response_serializer),
        )

    def _coroutine(
        self, method: str, gate: Gate, behavior: Callable[..., Any], request_of: Callable[..., Any]
    ) -> Callable[..., Any]:
        check = self._authorizer(method, streaming_requests=False)

        async def handler(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = await self._authenticate(method, context)
            if not gate.try_enter():
                await self._refuse(method, context, gate)
            try:
                try:
                    request = request_of(raw)
                    check(identity, request)
                except RaftStateError as err:
                    await context.abort(err.grpc_code, err.message, trailing_metadata(err))
                return await behavior(request, context)
            finally:
                gate.leave()

        return handler

    def _generator(
        self,
        method: str,
        gate: Gate,
        behavior: Callable[..., Any],
        request_of: Callable[..., Any],
        request_streaming: bool,
    ) -> Callable[..., Any]:
        check = self._authorizer(method, streaming_requests=request_streaming)

        async def handler(raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            identity = await self._authenticate(method, context)
            if not gate.try_enter():
                await self._refuse(method, context, gate)
            try:
                try:
                    request = request_of(raw)
                    check(identity, request)
                except RaftStateError as err:
                    await context.abort(err.grpc_code, err.message, trailing_metadata(err))
                try:
                    async for response in behavior(request, context):
                        yield response
                except RaftStateError as err:
                    await context.abort(err.grpc_code, err.message, trailing_metadata(err))
            finally:
                gate.leave()

        return handler

    # ---- authentication and authorization ---------------------------------------

    async def _authenticate(
        self, method: str, context: grpc.aio.ServicerContext
    ) -> Identity | None:
        """The caller's identity (``None``: auth is off or the method is
        public); aborts with UNAUTHENTICATED. Sets ``CURRENT_IDENTITY``."""
        if self.authenticator is None or method_access(method) is Access.PUBLIC:
            CURRENT_IDENTITY.set(None)
            return None
        try:
            identity = self.authenticator.authenticate(context)
        except Unauthenticated as err:
            self.unauthenticated += 1
            self._log_refusal(method, "unauthenticated", f"{err.message} (peer {context.peer()})")
            await context.abort(err.grpc_code, err.message, trailing_metadata(err))
            raise AssertionError("unreachable: abort raises") from err
        CURRENT_IDENTITY.set(identity)
        return identity

    def _authorizer(
        self, method: str, *, streaming_requests: bool
    ) -> Callable[[Identity | None, Any], None]:
        def check(identity: Identity | None, request: Any) -> None:
            if identity is None or streaming_requests:
                return
            device_id = getattr(request, "device_id", None)
            try:
                authorize(identity, method, [device_id] if device_id is not None else [])
            except PermissionDenied as err:
                self.log_denied(method, identity, err)
                raise

        return check

    def log_denied(self, method: str, identity: Identity, err: PermissionDenied) -> None:
        """Count and (rate-limited) log a PERMISSION_DENIED; handlers of
        streams call this for each denied message."""
        self.denied += 1
        self._log_refusal(method, "denied", f"{identity.describe()}: {err.message}")

    def _log_refusal(self, method: str, kind: str, text: str) -> None:
        held = self._throttle.admit((method, kind), self._clock())
        if held is not None:
            log.warning("refused %s (%s): %s%s", method, kind, text, held_suffix(held))

    async def _refuse(self, method: str, context: grpc.aio.ServicerContext, gate: Gate) -> None:
        err = gate.refusal()
        held = self._throttle.admit((method, gate.field), self._clock())
        if held is not None:
            log.warning("refused %s: %s%s", method, err.message, held_suffix(held))
        await context.abort(err.grpc_code, err.message, trailing_metadata(err))

    def _parser(self, method: str, decode: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        limit = request_byte_limit(method)

        def parse(raw: bytes) -> Any:
            if len(raw) > limit:
                self.oversized += 1
                too_big = ResourceExhausted(
                    f"request: {len(raw)} bytes, more than the {limit} bytes a "
                    f"{method.rsplit('/', 1)[-1]} request may have"
                )
                too_big.reason = "REQUEST_TOO_LARGE"
                held = self._throttle.admit((method, "oversized"), self._clock())
                if held is not None:
                    log.warning("refused %s: %s%s", method, too_big.message, held_suffix(held))
                raise too_big
            try:
                return decode(raw)
            except Exception as exc:  # protobuf's DecodeError, or anything a decoder raises
                self.bad_requests += 1
                descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
                what = getattr(descriptor, "full_name", "") or "request message"
                err = InvalidArgument("request", f"{len(raw)} bytes are not a valid {what}: {exc}")
                held = self._throttle.admit((method, "undecodable"), self._clock())
                if held is not None:
                    log.warning("refused %s: %s%s", method, err.message, held_suffix(held))
                raise err from None

        return parse


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """The response serializer, passing ``bytes`` through unchanged: a
    handler may yield a message it serialized itself (Watch responses are
    assembled from bytes shared across watchers, raftstate/watchwire.py)."""
    if serialize is None:
        return None

    def passthrough(message: Any) -> bytes:
        if type(message) is bytes:
            return message
        return serialize(message)

    return passthrough


async def _decoded(raw: AsyncIterator[bytes], parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
    async for message in raw:
        yield parse(message)
