"""One line per gRPC call: when it ended, the method, the model, the status and how long it took.

``rnnserve serve --access-log`` (or ``RNNSERVE_ACCESS_LOG=1``) turns it on; ``rnnserve up`` turns it
on unless given ``--no-access-log``. Each finished call writes one line to stderr::

    2026-12-04T20:31:07.123Z grpc /rnnserve.v1.RnnServe/Step model=sum_sign_lstm status=OK us=412

- the time is when the call ended, UTC, ISO 8601 with milliseconds;
- ``model`` is the model the request names (``model``, ``name``, ``model_name`` or a packed block's
  ``model``) or, for calls that name a session, that session's model; ``-`` when there is none
  (health, reflection, ListModels, an unknown session);
- ``status`` is the gRPC status code's name (``OK``, ``INVALID_ARGUMENT``, ``CANCELLED``, ...);
- ``us`` is the whole call in microseconds: a stream's from its start to its end.

The native data plane prints the identical line; keep the two in step.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc

ENV = "RNNSERVE_ACCESS_LOG"
FLAG = "--access-log"
MODEL_FIELDS = ("model", "name", "model_name")


def enabled(default: bool) -> bool:
    """The environment's say when it has one (1/true/yes/on or 0/false/no/off), else ``default``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def add_flag(parser: argparse.ArgumentParser, default: bool = False) -> None:
    """``--access-log/--no-access-log``; off unless ``default`` (``up``) or the environment."""
    on = enabled(default)
    parser.add_argument(
        FLAG,
        action=argparse.BooleanOptionalAction,
        default=on,
        help=f"one line per gRPC call on stderr: method, model, status, µs "
        f"[{ENV}, {'on' if on else 'off'}]",
    )


def line(method: str, model: str, status: str, micros: int, ended: datetime) -> str:
    stamp = ended.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ended.microsecond // 1000:03d}Z"
    return f"{stamp} grpc {method} model={model or '-'} status={status} us={micros}"


class AccessLog(grpc.aio.ServerInterceptor):
    """A grpc.aio interceptor writing ``line(...)`` for every call. ``bind(engine)`` lets it name
    the model of calls that carry only a session id."""

    def __init__(self, write: Callable[[str], None] | None = None) -> None:
        self._write = write or _stderr
        self._engine: Any = None

    def bind(self, engine: Any) -> None:
        self._engine = engine

    @property
    def write(self) -> Callable[[str], None]:
        """Where the lines go (the native data plane writes its lines there too)."""
        return self._write

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None:  # gRPC answers UNIMPLEMENTED itself
            self._log(method, "", "UNIMPLEMENTED", time.perf_counter_ns())
            return None
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(method, handler.unary_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._to_stream(method, handler.unary_stream))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._from_stream(method, handler.stream_unary))
        return handler._replace(stream_stream=self._streams(method, handler.stream_stream))

    # ---- the four call shapes ------------------------------------------------------------------
    def _unary(self, method: str, inner):
        async def behavior(request, context):
            start, model = time.perf_counter_ns(), self._model(request)
            status = "OK"
            try:
                return await inner(request, context)
            except BaseException as e:
                status = _failed(context, e)
                raise
            finally:
                self._log(method, model, _set_code(context) or status, start)

        return behavior

    def _to_stream(self, method: str, inner):
        if not inspect.isasyncgenfunction(inner):  # a coroutine writing with context.write
            return self._unary(method, inner)

        async def behavior(request, context):
            start, model = time.perf_counter_ns(), self._model(request)
            status = "OK"
            try:
                async for reply in inner(request, context):
                    yield reply
            except BaseException as e:
                status = _failed(context, e)
                raise
            finally:
                self._log(method, model, _set_code(context) or status, start)

        return behavior

    def _from_stream(self, method: str, inner):
        async def behavior(requests, context):
            start, first = time.perf_counter_ns(), FirstRequest(requests)
            status = "OK"
            try:
                return await inner(first, context)
            except BaseException as e:
                status = _failed(context, e)
                raise
            finally:
                self._log(method, self._model(first.request), _set_code(context) or status, start)

        return behavior

    def _streams(self, method: str, inner):
        if not inspect.isasyncgenfunction(inner):
            return self._from_stream(method, inner)

        async def behavior(requests, context):
            start, first = time.perf_counter_ns(), FirstRequest(requests)
            status = "OK"
            try:
                async for reply in inner(first, context):
                    yield reply
            except BaseException as e:
                status = _failed(context, e)
                raise
            finally:
                self._log(method, self._model(first.request), _set_code(context) or status, start)

        return behavior

    # ---- what goes in the line ----------------------------------------------------------------
    def _model(self, request: Any) -> str:
        """The model a request names, or its session's model; "" when neither is known."""
        if request is None:
            return ""
        for name in MODEL_FIELDS:
            value = getattr(request, name, None)
            if isinstance(value, str) and value:
                return value
        packed = getattr(request, "packed", None)
        if packed is not None and packed.model:
            return packed.model
        steps = getattr(request, "steps", None)
        if steps and not isinstance(steps, int):  # StepMany: its first entry's session
            return self._session_model(steps[0].session_id)
        return self._session_model(getattr(request, "session_id", ""))

    def _session_model(self, session_id: str) -> str:
        if not session_id or self._engine is None:
            return ""
        session = self._engine.sessions.peek(session_id)  # no touch: logging must not extend TTLs
        return session.key.rsplit(":", 1)[0] if session is not None else ""

    def _log(self, method: str, model: str, status: str, start_ns: int) -> None:
        micros = (time.perf_counter_ns() - start_ns) // 1000
        self._write(line(method, model, status, micros, datetime.now(UTC)))


class FirstRequest:
    """A request stream passed through unchanged, keeping its first message for the log."""

    def __init__(self, requests: AsyncIterator[Any]) -> None:
        self._requests = requests
        self.request: Any = None

    def __aiter__(self) -> FirstRequest:
        return self

    async def __anext__(self) -> Any:
        message = await self._requests.__anext__()
        if self.request is None:
            self.request = message
        return message


def _failed(context: Any, error: BaseException) -> str:
    """The status a call that raised ends with: an abort's code, CANCELLED, or UNKNOWN."""
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return _set_code(context) or "UNKNOWN"


def _set_code(context: Any) -> str:
    """The code the handler set (``abort`` or ``set_code``), "" when it set none."""
    try:
        code = context.code()
    except Exception:  # an older grpc without ServicerContext.code()
        return ""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # some grpc versions hand back the raw cygrpc value
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "")
    return ""


def _stderr(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
