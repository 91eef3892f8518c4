"""One gate in front of every RPC of every service: malformed bytes and overload get clean answers.

``RpcGuard`` is a grpc.aio server interceptor. For each method it wraps the handler once (cached):

* **Malformed protobuf.** grpc.aio runs a handler's ``request_deserializer`` itself; a
  ``DecodeError`` there becomes UNKNOWN (unary requests) or INTERNAL (streams, inside the
  servicer's loop) plus a traceback in the log for every bad message. The wrapped deserializer
  never raises for a unary request: it returns a ``Malformed`` marker that the wrapped behaviour
  answers with INVALID_ARGUMENT. For a request stream it raises ``MalformedMessage`` (an
  ``InvalidInput``), so the servicer fails that stream with INVALID_ARGUMENT like any bad input.
* **Overload.** Past ``max_concurrent`` RPCs in flight, a new one is refused at once with
  RESOURCE_EXHAUSTED naming the limit (health checks are exempt: they are cheap, and an
  orchestrator must see a busy server as alive).

Both are logged at most once per ``LOG_EVERY_S`` with a count, and reported to ``on_refused``
(the metrics). Why calls came back CANCELLED before this existed: gRPC core queues calls the
application has not yet asked for (grpc.aio asks for one at a time, from the event loop), and
past ``grpc.server.max_pending_requests`` (default 1,000) it drops new ones at random, up to all
of them at the hard limit (default 3,000), answering CANCELLED without a word to the application.
``pending_request_options`` raises those limits above what this guard admits, so an overloaded
server answers RESOURCE_EXHAUSTED itself instead.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving.errors import InvalidInput

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
MAX_CACHED_HANDLERS = 1024  # more than any server's methods; past it handlers are wrapped per call
MIN_PENDING_REQUESTS = 20_000


def pending_request_options(max_concurrent: int) -> list[tuple[str, int]]:
    """Core's queue of calls not yet accepted by the application: at least twice what the guard
    admits, soft = hard, so a burst waits there for the guard (which answers RESOURCE_EXHAUSTED
    at once) instead of being dropped. A queued call is a few kB; the queue is bounded all the
    same, as a client can open calls faster than any server takes them."""
    pending = max(2 * max_concurrent, MIN_PENDING_REQUESTS)
    return [
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending),
    ]


class MalformedMessage(InvalidInput):
    """A request message whose bytes do not parse as the method's request type."""


class Malformed:
    """What a unary request's deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: MalformedMessage) -> None:
        self.error = error


class RateLimitedLog:
    """``warning`` at most once per ``every_s`` per key; the line counts the events since the
    last line of that key, this one included (a fuzzing client must not be able to fill the
    disk with our log)."""

    def __init__(self, logger: logging.Logger, every_s: float = LOG_EVERY_S) -> None:
        self._log = logger
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        now = time.monotonic()
        if now - self._last.get(key, -self._every_s) < self._every_s:
            return
        count, self._count[key], self._last[key] = self._count[key], 0, now
        self._log.warning("%s (%d of these since the last report)", message, count)


class RpcGuard(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        max_concurrent: int,
        on_refused: Callable[[str, str], None] | None = None,
        every_s: float = LOG_EVERY_S,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.active = 0  # RPCs admitted and not finished
        self._on_refused = on_refused or (lambda method, reason: None)
        self._log = RateLimitedLog(log, every_s)
        self._wrapped: dict[Any, Any] = {}  # handler -> its guarded copy

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return None
        guarded = self._wrapped.get(handler)
        if guarded is None:
            guarded = self._guard(handler, details.method)
            # an interceptor before this one may build a handler per call: the cache must not
            # grow with them (last in the chain, this one sees the registered handlers)
            if len(self._wrapped) < MAX_CACHED_HANDLERS:
                self._wrapped[handler] = guarded
        return guarded

    # ---- wrapping -------------------------------------------------------------------------------
    def _guard(self, handler: Any, method: str) -> Any:
        kind = _KINDS[(handler.request_streaming, handler.response_streaming)]
        behavior = getattr(handler, kind)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync handler: not served by this server, left alone
        deserialize = handler.request_deserializer
        if deserialize is not None:
            deserialize = self._deserializer(deserialize, method, handler.request_streaming)
        exempt = method.startswith(EXEMPT_PREFIXES)
        wrap = self._streaming if handler.response_streaming else self._unary
        return handler._replace(
            request_deserializer=deserialize, **{kind: wrap(behavior, method, exempt)}
        )

    def _deserializer(self, deserialize: Callable, method: str, streaming: bool) -> Callable:
        message_type = _type_name(deserialize)

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception:
                err = MalformedMessage(
                    f"malformed request: the bytes are not a valid {message_type} message",
                    field="request",
                )
                self._refused(method, "malformed", f"malformed {message_type} on {method}")
                if streaming:
                    raise err from None  # the servicer fails its stream with INVALID_ARGUMENT
                return Malformed(err)

        return parse

    def _unary(self, behavior: Callable, method: str, exempt: bool) -> Callable:
        async def guarded(request: Any, context: Any) -> Any:
            await self._check(request, context, method, exempt)
            self.active += 1
            try:
                return await behavior(request, context)
            finally:
                self.active -= 1

        return guarded

    def _streaming(self, behavior: Callable, method: str, exempt: bool) -> Callable:
        async def guarded(request: Any, context: Any) -> Any:
            await self._check(request, context, method, exempt)
            self.active += 1
            try:
                async for reply in behavior(request, context):
                    yield reply
            except MalformedMessage as err:  # a servicer that let it through (reflection)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            finally:
                self.active -= 1

        return guarded

    async def _check(self, request: Any, context: Any, method: str, exempt: bool) -> None:
        if type(request) is Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
        if self.active >= self.max_concurrent and not exempt:
            message = (
                f"server overloaded: {self.active} RPCs in flight, the limit is "
                f"{self.max_concurrent} (max_concurrent_rpcs); retry later"
            )
            self._refused(method, "overloaded", f"refused {method}: {message}")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    def _refused(self, method: str, reason: str, message: str) -> None:
        self._on_refused(method, reason)
        self._log.warning(reason, message)


_KINDS = {
    (False, False): "unary_unary",
    (False, True): "unary_stream",
    (True, False): "stream_unary",
    (True, True): "stream_stream",
}


def _type_name(deserialize: Callable) -> str:
    """The protobuf type a ``Message.FromString`` deserializer parses (else its name)."""
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", getattr(deserialize, "__qualname__", "request"))
