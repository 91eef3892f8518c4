"""The Python side of the core's generic bridge: every RPC the core does not serve natively comes
here as (method, request bytes) and leaves as (code, message, status details, reply messages).

It runs the handlers of ``serving.grpc_api`` (ListModels, GetModel, Predict) and
``serving.oip_api`` (health, metadata, Triton's configuration and repository index, stateless
inference on whole-sequence models) on the server's event loop, with a context whose ``abort``
captures the status. Generate runs the shared rollout over the core's sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from serving import errors, grpc_api, oip_api
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.core.model_control import ModelControl
from serving.engine import Engine, StepResult, check_generate, rollout
from serving.security import act_as

log = logging.getLogger(__name__)

# code, message, google.rpc.Status bytes, replies, the model the call was about (access log)
Reply = tuple[int, str, bytes, list[bytes], str]
OK = grpc.StatusCode.OK.value[0]
CANCELLED = grpc.StatusCode.CANCELLED.value[0]
Emit = Callable[[bytes], bool]  # the core's: sends one reply of a stream now; False once gone
_LOG_EVERY_S = 10.0  # malformed requests are logged at most this often (with a count)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, details: bytes) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details


class BridgeContext:
    """What the servicers use of a grpc.aio context: ``abort`` ends the call with a status."""

    def __init__(self, identity: str) -> None:
        self.identity = identity

    async def abort(self, code: grpc.StatusCode, message: str = "", trailing_metadata=()) -> None:
        details = dict(trailing_metadata or ()).get("grpc-status-details-bin", b"")
        raise _Aborted(code, message, details)

    def invocation_metadata(self) -> tuple:
        return ()


def _error_from(reply: tuple) -> errors.RnnServeError:
    """The domain error a native answer names by its reason word."""
    _, reason, message, field, expected = reply
    by_reason = {cls.reason: cls for cls in _error_classes()}
    cls = by_reason.get(reason, errors.RnnServeError)
    if cls is errors.StepOutOfOrder:
        return errors.StepOutOfOrder(message, expected)
    if issubclass(cls, errors.InvalidInput):
        return cls(message, field)
    return cls(message)


def _error_classes() -> list[type[errors.RnnServeError]]:
    found, todo = [], [errors.RnnServeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


class Bridge:
    def __init__(
        self,
        engine: Engine,
        core: Any,
        loop: asyncio.AbstractEventLoop,
        control: ModelControl | None = None,
    ) -> None:
        self.engine, self.core, self.loop = engine, core, loop
        self.rnnserve = grpc_api.RnnServeServicer(engine)
        self.oip = oip_api.GRPCInferenceService(engine, control)
        self._steps = ThreadPoolExecutor(4, thread_name_prefix="rnnserve-generate")
        self._malformed = 0
        self._malformed_logged = 0.0
        self.routes = self._routes()

    def _routes(self) -> dict[str, tuple[Any, Callable[..., Any], bool]]:
        """Full method name → (request class, handler, server-streaming)."""
        rs = "/rnnserve.v1.RnnServe/"
        routes: dict[str, tuple[Any, Callable[..., Any], bool]] = {
            rs + "ListModels": (pb.ListModelsRequest, self.rnnserve.ListModels, False),
            rs + "GetModel": (pb.GetModelRequest, self.rnnserve.GetModel, False),
            rs + "Predict": (pb.PredictRequest, self.rnnserve.Predict, False),
            rs + "Generate": (pb.GenerateRequest, self.generate, True),
        }
        for name, (request, _) in oip_api.BRIDGED.items():
            routes[f"/{oip_api.SERVICE_NAME}/{name}"] = (
                getattr(oip_api.pb, request),
                getattr(self.oip, name),
                False,
            )
        return routes

    # ---- called by the core, on a bridge thread, with the GIL -----------------------------------
    def __call__(
        self, method: str, request: bytes, identity: str, emit: Emit | None = None
    ) -> Reply:
        """``emit(reply_bytes) -> bool`` sends a streaming call's reply at once (False: the
        client is gone); without it a stream's replies come back in the list, after the call."""
        route = self.routes.get(method)
        if route is None:
            return grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!", b"", [], ""
        cls, handler, streaming = route
        try:
            message = cls.FromString(request)
        except DecodeError as e:
            return self._malformed_request(method, e)
        work = (
            self._stream(handler, message, identity, emit)
            if streaming
            else self._unary(handler, message, identity)
        )
        code, text, details, replies = asyncio.run_coroutine_threadsafe(work, self.loop).result()
        return code, text, details, replies, self._model_of(message)

    def _model_of(self, message: Any) -> str:
        """The model a request names, or its session's: the access log's ``model=``."""
        for name in ("model", "name", "model_name"):
            value = getattr(message, name, None)
            if isinstance(value, str) and value:
                return value
        session_id = getattr(message, "session_id", "")
        found = self.core.session(session_id) if session_id and ":" not in session_id else None
        return found[1] if found and found[0] == "ok" else ""

    def _malformed_request(self, method: str, e: Exception) -> Reply:
        """INVALID_ARGUMENT naming the message type, logged at most every few seconds."""
        self._malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged > _LOG_EVERY_S:
            log.warning("%d malformed request(s), the last to %s: %s", self._malformed, method, e)
            self._malformed, self._malformed_logged = 0, now
        code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        name = self.routes[method][0].DESCRIPTOR.full_name
        return code, f"malformed request: the bytes are not a valid {name} message", b"", [], ""

    async def _unary(self, handler: Callable[..., Any], message: Any, identity: str) -> tuple:
        act_as(identity or None)  # this call's own task
        try:
            reply = await handler(message, BridgeContext(identity))
        except _Aborted as a:
            return a.code.value[0], a.message, a.details, []
        except Exception as e:  # the handlers map domain errors themselves; this is a bug
            log.exception("bridged call failed")
            return grpc.StatusCode.INTERNAL.value[0], f"internal error: {e!r}", b"", []
        return OK, "", b"", [reply.SerializeToString()]

    async def _stream(
        self, handler: Callable[..., Any], message: Any, identity: str, emit: Emit | None
    ) -> tuple:
        act_as(identity or None)
        replies: list[bytes] = []
        send = emit or replies.append
        stream = handler(message, BridgeContext(identity))
        try:
            async for reply in stream:
                if send(reply.SerializeToString()) is False:  # gone: stop generating for nobody
                    return CANCELLED, "the client went away", b"", []
        except _Aborted as a:
            return a.code.value[0], a.message, a.details, replies
        finally:
            await stream.aclose()
        return OK, "", b"", replies

    # ---- Generate over the core's sessions ------------------------------------------------------
    async def generate(self, request: pb.GenerateRequest, context: BridgeContext) -> AsyncIterator:
        try:
            async for reply in self._generate(request):
                yield reply
        except Exception as err:
            await grpc_api._abort(context, err)

    async def _generate(self, request: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        session_id = grpc_api.own_session(request.session_id)
        found = self.core.session(session_id)
        if found[0] != "ok":
            raise _error_from(found)
        _, model, version, _, _, last_y = found
        m = self.engine.model(model, version).manifest
        check_generate(m, request.max_tokens, request.temperature, request.top_k)
        if request.HasField("prompt") and request.prompt.WhichOneof("data"):
            prompt = grpc_api.decode_input(m, request.prompt, self.engine.input_limit(m))
            y = (await self._step(session_id, prompt)).y[-1]
        elif last_y is None:
            raise errors.InvalidInput("a fresh session needs a prompt to generate from", "prompt")
        else:
            y = last_y

        def step(x: np.ndarray) -> Any:
            return self._step(session_id, x)

        steps = rollout(m, step, y, request.max_tokens, request.temperature, request.top_k,
                        request.seed)  # fmt: skip
        async for g in steps:
            yield self.rnnserve.generated(m, g)

    async def _step(self, session_id: str, x: np.ndarray) -> StepResult:
        answer = await self.loop.run_in_executor(self._steps, self.core.step, session_id, x)
        if answer[0] != "ok":
            raise _error_from(answer)
        return StepResult(answer[1], answer[2])
