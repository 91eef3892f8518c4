"""Our gRPC API (``rnnserve.v1.RnnServe``): translates messages to ``Engine`` calls and back.

No behaviour lives here beyond translation: inputs are decoded with ``serving.codec`` against the
model's manifest, outputs are put in the model's own terms with ``codec.format_output``, and errors
are mapped with ``serving.errors.grpc_status`` and sent as a rich status (``google.rpc.Status`` with
an ``ErrorInfo`` carrying the reason and, where it helps, a ``BadRequest`` naming the field or the
expected step index).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.engine import CheckedStep, Engine, Generated, SessionInfo, StepResult
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
    return output_messages(m, y.reshape(1, -1), top_k)[0]


def output_messages(m: Manifest, y: np.ndarray, top_k: int = DEFAULT_TOP_K) -> list[pb.Output]:
    """Head outputs (N, O), one row per time step → N ``Output``s in the model's terms.

    The hot path of every step: regression and classification take one NumPy pass (softmax,
    argmax, ``tolist``) for all rows and one message constructor per row, with the numbers
    ``codec.format_output`` gives (its dict per row costs more than the message)."""
    kind = m.output.kind
    raw = y.tolist()
    if kind == "regression":
        return [pb.Output(raw=r, value=r) for r in raw]
    p = codec.probabilities(m, y)  # (N, K) aligned with the labels
    if kind == "classification":
        labels = m.labels
        return [
            pb.Output(raw=r, label=labels[best], index=best, probabilities=q)
            for r, best, q in zip(raw, p.argmax(axis=-1).tolist(), p.tolist(), strict=True)
        ]
    return [_next_token_output(m, r, row, top_k) for r, row in zip(raw, p, strict=True)]


def _next_token_output(m: Manifest, raw: list[float], p: np.ndarray, top_k: int) -> pb.Output:
    """One step of a char model: the most likely char and the top_k candidates from p (K,)."""
    names = m.labels
    best = int(p.argmax())
    order = np.argsort(-p)[:top_k].tolist()
    ps = p.tolist()
    top = [pb.TokenProb(char=names[i], index=i, p=ps[i]) for i in order]
    return pb.Output(raw=raw, char=names[best], index=best, top_k=top)


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


def _outputs_by_model(
    requests: Sequence[pb.StepRequest],
    outcomes: list[StepResult | Exception | None],
    where: list[int],
    manifests: list[Manifest],
) -> dict[int, list[pb.Output]]:
    """The answered entries' outputs, keyed by position: every answered row of one model (and
    top_k) goes through ``output_messages`` at once."""
    rows: dict[tuple[int, int], list[int]] = {}  # (id of manifest, top_k) -> positions
    by_id: dict[int, Manifest] = {}
    for pos, m in zip(where, manifests, strict=True):
        if isinstance(outcomes[pos], StepResult):
            top_k = (requests[pos].top_k or DEFAULT_TOP_K) if m.output.kind == "next_token" else 0
            rows.setdefault((id(m), top_k), []).append(pos)
            by_id[id(m)] = m
    outputs: dict[int, list[pb.Output]] = {}
    for (key, top_k), positions in rows.items():
        ys = [outcomes[pos].y for pos in positions]  # type: ignore[union-attr]  # each (T, O)
        flat = output_messages(by_id[key], np.concatenate(ys), top_k or DEFAULT_TOP_K)
        start = 0
        for pos, y in zip(positions, ys, strict=True):
            outputs[pos] = flat[start : start + len(y)]
            start += len(y)
    return outputs


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
            yield await self._step_many(message.steps)

    async def _step_many(self, requests: Sequence[pb.StepRequest]) -> pb.StepManyResponse:
        """All entries in one pass each way: look up and decode, one ``Engine.step_many`` (one
        scheduler group per model), then the replies with one NumPy pass per model."""
        e = self.engine
        outcomes: list[StepResult | Exception | None] = [None] * len(requests)
        checked: list[CheckedStep] = []
        where: list[int] = []  # position in the message of each checked step
        for pos, req in enumerate(requests):
            try:
                sess, rt = e.lookup(req.session_id)
                m = rt.manifest
                x = decode_input(m, req.input, e.input_limit(m))
            except Exception as err:
                outcomes[pos] = err
                continue
            index = req.step_index if req.HasField("step_index") else None
            checked.append((sess, rt, x, index))
            where.append(pos)
        expires_at = time.time() + e.sessions.ttl_s  # the lookups just pushed the deadlines back
        for pos, outcome in zip(where, await e.step_many(checked), strict=True):
            outcomes[pos] = outcome
        manifests = [c[1].manifest for c in checked]
        replies = self._many_replies(requests, outcomes, where, manifests, expires_at)
        return pb.StepManyResponse(results=replies)

    def _many_replies(
        self,
        requests: Sequence[pb.StepRequest],
        outcomes: list[StepResult | Exception | None],
        where: list[int],
        manifests: list[Manifest],
        expires_at: float,
    ) -> list[pb.StepResult]:
        outputs = _outputs_by_model(requests, outcomes, where, manifests)
        chars = {p for p, m in zip(where, manifests, strict=True) if m.output.kind == "next_token"}
        results = []
        for pos, (req, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            sid = req.session_id
            if isinstance(outcome, StepResult):
                reply = pb.StepResponse(
                    session_id=sid,
                    step_index=outcome.step_index,
                    outputs=outputs[pos],
                    expires_at=expires_at,
                )
                if pos in chars:
                    reply.text = "".join(o.char for o in outputs[pos])
                results.append(pb.StepResult(session_id=sid, reply=reply))
            else:
                assert outcome is not None
                results.append(pb.StepResult(session_id=sid, error=self._entry_error(outcome)))
        return results

    def _entry_error(self, err: Exception) -> pb.Error:
        if not isinstance(err, RnnServeError):
            log.error("StepMany entry failed: %r", err)
        self._count("StepMany.entry", grpc_status(err).name)
        return error_message(err)

    async def _step(self, session_id: str, request: pb.StepRequest) -> pb.StepResponse:
        e = self.engine
        sess, rt = e.lookup(session_id)
        m = rt.manifest
        x = decode_input(m, request.input, e.input_limit(m))
        index = request.step_index if request.HasField("step_index") else None
        result = await e.step_checked(sess, rt, x, index)
        reply = pb.StepResponse(
            session_id=session_id,
            step_index=result.step_index,
            outputs=output_messages(m, result.y, request.top_k or DEFAULT_TOP_K),
            expires_at=e.expires_at(sess),
        )
        if m.output.kind == "next_token":
            reply.text = "".join(o.char for o in reply.outputs)
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
            model=m.name, version=m.version, outputs=output_messages(m, y, top_k)
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
