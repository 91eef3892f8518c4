"""Our gRPC API (``rnnserve.v1.RnnServe``): translates messages to ``Engine`` calls and back.

No behaviour lives here beyond translation: inputs are decoded with ``serving.codec`` against the
model's manifest, outputs are put in the model's own terms with ``codec.format_output``, and errors
are mapped with ``serving.errors.grpc_status`` and sent as a rich status (``google.rpc.Status`` with
an ``ErrorInfo`` carrying the reason and, where it helps, a ``BadRequest`` naming the field or the
expected step index).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.engine import Engine, Generated, SessionInfo, StepResult
from serving.errors import InvalidInput, PayloadTooLarge, RnnServeError, StepOutOfOrder, grpc_status
from serving.manifest import Manifest
from serving.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name  # "rnnserve.v1.RnnServe"
DEFAULT_TOP_K = 5
MAX_STEPMANY_ENTRIES = 4096

# ---- errors -----------------------------------------------------------------------------------


def rich_status(err: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata with a google.rpc.Status) for a domain error."""
    code = grpc_status(err)
    message = str(err) if isinstance(err, RnnServeError) else f"internal error: {err!r}"
    info = error_details_pb2.ErrorInfo(
        reason=getattr(err, "reason", "INTERNAL"), domain="rnnserve.v1", metadata=_error_meta(err)
    )
    details = [_pack(info)]
    if isinstance(err, InvalidInput):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=err.field or "input", description=message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return code, message, (("grpc-status-details-bin", status.SerializeToString()),)


def _error_meta(err: BaseException) -> dict[str, str]:
    meta = {}
    if isinstance(err, StepOutOfOrder):
        meta["expected_step_index"] = str(err.expected)
    if isinstance(err, InvalidInput) and err.field:
        meta["field"] = err.field
    return meta


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def error_message(err: BaseException) -> pb.Error:
    """The per-entry error of StepMany."""
    out = pb.Error(
        code=grpc_status(err).name,
        reason=getattr(err, "reason", "INTERNAL"),
        message=str(err) if isinstance(err, RnnServeError) else f"internal error: {err!r}",
    )
    if isinstance(err, StepOutOfOrder):
        out.expected_step_index = err.expected
    if isinstance(err, InvalidInput):
        out.field = err.field
    return out


async def _abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    code, message, trailing = rich_status(err)
    await context.abort(code, message, trailing_metadata=trailing)


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Unary handlers: domain errors → status; every call counted by method and code."""

    @functools.wraps(method)
    async def wrapper(self: RnnServeServicer, request: Any, context: Any) -> Any:
        try:
            reply = await method(self, request, context)
        except Exception as err:
            await self._failed(method.__name__, context, err)
        self._count(method.__name__, "OK")
        return reply

    return wrapper


def _stream(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Streaming handlers: replies already sent stay sent; the first error ends the stream."""

    @functools.wraps(method)
    async def wrapper(self: RnnServeServicer, request: Any, context: Any) -> AsyncIterator[Any]:
        try:
            async for reply in method(self, request, context):
                yield reply
        except Exception as err:
            await self._failed(method.__name__, context, err)
        self._count(method.__name__, "OK")

    return wrapper


# ---- messages ↔ arrays ------------------------------------------------------------------------


def decode_input(m: Manifest, inp: pb.Input, max_steps: int | None = None) -> np.ndarray:
    """An ``Input`` → (T, F) float32 or (T,) int64, validated against the manifest."""
    which = inp.WhichOneof("data")
    if which == "features":
        f = int(m.input.features or 0)
        values = np.asarray(inp.features.values, dtype=np.float32)
        steps = inp.features.steps
        if m.input.kind == "features" and not steps:
            if f and values.size % f:
                raise InvalidInput(
                    f"{values.size} values are not a whole number of {f}-feature steps",
                    field="input.features",
                )
            steps = values.size // f if f else 0
        return codec.decode_features(m, values, steps=steps, max_steps=max_steps)
    if which == "text":
        return codec.decode_text(m, inp.text, max_steps=max_steps)
    if which == "tokens":
        return codec.decode_tokens(m, list(inp.tokens.ids), max_steps=max_steps)
    raise InvalidInput("empty input: set features, text or tokens", field="input")


def output_message(m: Manifest, y: np.ndarray, top_k: int = DEFAULT_TOP_K) -> pb.Output:
    """One time step's head output (O,) → ``Output`` in the model's terms."""
    kind = m.output.kind
    # the hot path (one per step): build regression and classification outputs directly, with the
    # same numbers codec.format_output gives (its dict costs more than the whole message)
    if kind == "regression":
        raw = y.tolist()
        return pb.Output(raw=raw, value=raw)
    if kind == "classification":
        p = codec.probabilities(m, y)  # (K,) aligned with the labels
        best = int(p.argmax())
        return pb.Output(raw=y.tolist(), label=m.labels[best], index=best, probabilities=p.tolist())
    formatted = codec.format_output(m, y, top_k=top_k)  # next_token
    out = pb.Output(raw=y.tolist(), char=formatted["char"], index=formatted["index"])
    out.top_k.extend(pb.TokenProb(**t) for t in formatted["top_k"])
    return out


def model_info(m: Manifest, versions: list[int]) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=m.name,
        version=m.version,
        versions=versions,
        task=m.task,
        description=m.description,
        input=pb.InputInfo(
            kind=m.input.kind,
            name=m.input.name,
            features=m.input.features or 0,
            vocab=m.input.vocab or [],
            max_steps=m.input.max_steps,
        ),
        output=pb.OutputInfo(
            kind=m.output.kind,
            size=m.output.size,
            activation=m.output.activation,
            labels=m.output.labels or [],
            vocab=m.output.vocab or [],
        ),
        state=[pb.StateInfo(name=s.name, layers=s.layers, size=s.size) for s in m.state],
        streamable=m.streamable,
        manifest_json=m.to_json(),
    )


def session_message(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        expires_at=info.expires_at,
        next_step_index=info.next_step_index,
    )


# ---- the servicer -----------------------------------------------------------------------------


class RnnServeServicer(pb_grpc.RnnServeServicer):
    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics

    # models
    @_rpc
    async def ListModels(self, request, context):
        e = self.engine
        models = sorted(e.models(), key=lambda lm: (lm.manifest.name, lm.manifest.version))
        return pb.ListModelsResponse(
            models=[model_info(lm.manifest, e.versions(lm.manifest.name)) for lm in models]
        )

    @_rpc
    async def GetModel(self, request, context):
        m = self.engine.model(request.name, request.version or None).manifest
        return model_info(m, self.engine.versions(m.name))

    # sessions
    @_rpc
    async def OpenSession(self, request, context):
        return session_message(self.engine.open_session(request.model, request.version or None))

    @_rpc
    async def CloseSession(self, request, context):
        self.engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    @_rpc
    async def ResetSession(self, request, context):
        return session_message(self.engine.reset_session(request.session_id))

    # steps
    @_rpc
    async def Step(self, request, context):
        return await self._step(request.session_id, request)

    @_stream
    async def Session(self, request_iterator, context):
        session_id = ""
        async for request in request_iterator:
            if not session_id:
                session_id = request.session_id
                if not session_id:
                    raise InvalidInput("the first message must name the session", "session_id")
            elif request.session_id and request.session_id != session_id:
                raise InvalidInput(
                    f"one session per stream: this stream is {session_id!r}", "session_id"
                )
            yield await self._step(session_id, request)

    @_stream
    async def StepMany(self, request_iterator, context):
        async for message in request_iterator:
            if len(message.steps) > MAX_STEPMANY_ENTRIES:
                raise PayloadTooLarge(
                    f"{len(message.steps)} entries in one StepMany message; "
                    f"at most {MAX_STEPMANY_ENTRIES}",
                    field="steps",
                )
            results = await asyncio.gather(*(self._step_entry(s) for s in message.steps))
            yield pb.StepManyResponse(results=results)

    async def _step_entry(self, request: pb.StepRequest) -> pb.StepResult:
        try:
            reply = await self._step(request.session_id, request)
        except Exception as err:
            if not isinstance(err, RnnServeError):
                log.exception("StepMany entry failed")
            self._count("StepMany.entry", grpc_status(err).name)
            return pb.StepResult(session_id=request.session_id, error=error_message(err))
        return pb.StepResult(session_id=request.session_id, reply=reply)

    async def _step(self, session_id: str, request: pb.StepRequest) -> pb.StepResponse:
        m = self.engine.session_manifest(session_id)
        x = decode_input(m, request.input, self.engine.config.max_steps_per_request)
        index = request.step_index if request.HasField("step_index") else None
        result = await self.engine.step(session_id, x, index)
        return self._step_reply(m, session_id, result, request.top_k or DEFAULT_TOP_K)

    def _step_reply(
        self, m: Manifest, session_id: str, result: StepResult, top_k: int
    ) -> pb.StepResponse:
        outputs = [output_message(m, row, top_k) for row in result.y]
        reply = pb.StepResponse(
            session_id=session_id,
            step_index=result.step_index,
            outputs=outputs,
            expires_at=self.engine.session(session_id).expires_at,
        )
        if m.output.kind == "next_token":
            reply.text = "".join(o.char for o in outputs)
        return reply

    # generation
    @_stream
    async def Generate(self, request, context):
        e = self.engine
        m = e.session_manifest(request.session_id)
        prompt = None
        if request.HasField("prompt") and request.prompt.WhichOneof("data"):
            prompt = decode_input(m, request.prompt, e.config.max_steps_per_request)
        events = e.generate(
            request.session_id,
            prompt,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            seed=request.seed,
        )
        async for g in events:
            yield self._generated(m, g)

    def _generated(self, m: Manifest, g: Generated) -> pb.GenerateResponse:
        reply = pb.GenerateResponse(step_index=g.step_index, output=output_message(m, g.y))
        if g.token is not None:
            reply.token = g.token
            reply.text = m.labels[g.token] if m.input.vocab is None else m.input.vocab[g.token]
        if g.value is not None:
            reply.value.extend(g.value.tolist())
        return reply

    # stateless
    @_rpc
    async def Predict(self, request, context):
        e = self.engine
        lm = e.model(request.model, request.version or None)
        m = lm.manifest
        rows = [decode_input(m, inp) for inp in request.inputs]
        y = await e.predict(m.name, m.version, rows)  # (B, O)
        top_k = request.top_k or DEFAULT_TOP_K
        return pb.PredictResponse(
            model=m.name, version=m.version, outputs=[output_message(m, row, top_k) for row in y]
        )

    # bookkeeping
    def _count(self, method: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.on_request(method, code)

    async def _failed(self, method: str, context: Any, err: Exception) -> None:
        if not isinstance(err, RnnServeError):
            log.exception("%s failed", method)
        self._count(method, grpc_status(err).name)
        await _abort(context, err)


def add_to_server(server: grpc.aio.Server, engine: Engine, metrics: Metrics | None = None) -> str:
    pb_grpc.add_RnnServeServicer_to_server(RnnServeServicer(engine, metrics), server)
    return SERVICE_NAME
