"""Our API's Python half (``rnnserve.v1.RnnServe``): the RPCs the native core bridges here
(ListModels, GetModel, Predict, and Generate's replies), translated to ``Engine`` calls and back.

No behaviour lives here beyond translation: inputs are decoded with ``serving.codec`` against the
model's manifest, outputs are put in the model's own terms with ``codec.format_output``, and errors
are mapped with ``serving.errors.grpc_status`` and sent as a rich status (``google.rpc.Status`` with
an ``ErrorInfo`` carrying the reason and, where it helps, a ``BadRequest`` naming the field or the
expected step index), as the core sends its own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.engine import Engine, Generated, check_predict_rows
from serving.errors import InvalidInput, RnnServeError, SessionNotFound, StepOutOfOrder, grpc_status
from serving.manifest import Manifest

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name  # "rnnserve.v1.RnnServe"
DEFAULT_TOP_K = 5
MAX_ERROR_MESSAGE = 1024  # characters of a status message (see _clipped)
FEW_ROWS = 4  # OutputRows converts up to this many rows in plain Python, more with NumPy


def own_session(session_id: str) -> str:
    """A session id as this API may address it: only ids the server issued (``token_urlsafe``,
    never a colon). Client-chosen ids of other transports (OIP's ``oip:<model>:<sequence_id>``)
    are guessable by design, so from here they do not exist."""
    if ":" in session_id:
        raise SessionNotFound(f"unknown session {session_id[:64]!r}")
    return session_id


# ---- errors -----------------------------------------------------------------------------------


def rich_status(err: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """(code, message, trailing metadata with a google.rpc.Status) for a domain error."""
    code = grpc_status(err)
    message = _clipped(_client_message(err))
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


def _client_message(err: BaseException) -> str:
    return str(err) if isinstance(err, RnnServeError) else f"internal error: {err!r}"


def _clipped(message: str) -> str:
    """Messages echo client values (a session id, a model name); the message travels twice in
    headers (grpc-message and the rich status), and over gRPC's metadata limit the client would
    get "Stream removed" instead of the status."""
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return message[: MAX_ERROR_MESSAGE - 1] + "…"


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


async def _abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    code, message, trailing = rich_status(err)
    await context.abort(code, message, trailing_metadata=trailing)


def _rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Handlers: a domain error ends the call with its status (the core counts every call)."""

    @functools.wraps(method)
    async def wrapper(self: RnnServeServicer, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except Exception as err:
            if not isinstance(err, RnnServeError):
                log.exception("%s failed", method.__name__)
            await _abort(context, err)

    return wrapper


# ---- messages ↔ arrays ------------------------------------------------------------------------


def decode_input(m: Manifest, inp: pb.Input, max_steps: int | None = None) -> np.ndarray:
    """An ``Input`` → (T, F) float32 or (T,) int64, validated against the manifest."""
    which = inp.WhichOneof("data")
    if which == "features":
        f = int(m.input.features or 0)
        values = np.asarray(list(inp.features.values), dtype=np.float32)
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
    holder = pb.StepResponse()
    OutputRows(m, y.reshape(1, -1), top_k).add_to(holder.outputs)
    return holder.outputs[0]


class OutputRows:
    """Head outputs (N, O) of one model, put in the model's terms with one NumPy pass (softmax,
    argmax, ``tolist``) for all N rows; ``add_to`` then writes rows straight into a reply's
    repeated ``outputs`` (building an ``Output`` and copying it in costs twice as much). The
    numbers are those ``codec.format_output`` gives; its dict per row costs more than the message.
    """

    __slots__ = ("best", "kind", "labels", "probs", "raw", "top_k")

    def __init__(self, m: Manifest, y: np.ndarray, top_k: int = DEFAULT_TOP_K) -> None:
        self.kind = m.output.kind
        self.raw = y.tolist()
        self.top_k = top_k
        if self.kind == "regression":
            return
        self.labels = m.labels
        if len(self.raw) <= FEW_ROWS:  # one Step's usual reply: plain Python beats NumPy calls
            self.probs = [codec.probabilities_row(m, row) for row in self.raw]
            self.best = [ps.index(max(ps)) for ps in self.probs]  # the first max, as argmax
            return
        p = codec.probabilities(m, y)  # (N, K) aligned with the labels
        self.best = p.argmax(axis=-1).tolist()
        self.probs = p.tolist()

    def add_to(self, outputs: Any, start: int = 0, stop: int | None = None) -> None:
        """Append rows [start, stop) to a repeated ``Output`` field."""
        add = outputs.add
        rows = range(start, len(self.raw) if stop is None else stop)
        raw = self.raw
        if self.kind == "regression":
            for i in rows:
                add(raw=raw[i], value=raw[i])
        elif self.kind == "classification":
            labels, best, probs = self.labels, self.best, self.probs
            for i in rows:
                add(raw=raw[i], label=labels[best[i]], index=best[i], probabilities=probs[i])
        else:
            for i in rows:
                out = add(raw=raw[i], char=self.labels[self.best[i]], index=self.best[i])
                ps = self.probs[i]
                for k in sorted(range(len(ps)), key=ps.__getitem__, reverse=True)[: self.top_k]:
                    out.top_k.add(char=self.labels[k], index=k, p=ps[k])

    def fill(self, reply: pb.StepResponse, start: int = 0, stop: int | None = None) -> None:
        """A step reply's outputs (rows [start, stop)) and, for next_token models, its text."""
        self.add_to(reply.outputs, start, stop)
        if self.kind == "next_token":
            reply.text = self.text(start, len(self.raw) if stop is None else stop)

    def text(self, start: int, stop: int) -> str:
        """next_token models: the most likely char after each of rows [start, stop)."""
        return "".join(self.labels[b] for b in self.best[start:stop])


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


# ---- the servicer -----------------------------------------------------------------------------


class RnnServeServicer:
    """The bridged methods of ``rnnserve.v1.RnnServe``, called as ``handler(request, context)``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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

    # stateless
    @_rpc
    async def Predict(self, request, context):
        e = self.engine
        lm = e.model(request.model, request.version or None)
        m = lm.manifest
        check_predict_rows(len(request.inputs))  # before decoding: a huge count is refused at once
        rows = [decode_input(m, inp) for inp in request.inputs]
        y = await e.predict(m.name, m.version, rows)  # (B, O)
        top_k = request.top_k or DEFAULT_TOP_K
        reply = pb.PredictResponse(model=m.name, version=m.version)
        OutputRows(m, y, top_k).add_to(reply.outputs)
        return reply

    @staticmethod
    def generated(m: Manifest, g: Generated) -> pb.GenerateResponse:
        reply = pb.GenerateResponse(step_index=g.step_index, output=output_message(m, g.y))
        if g.token is not None:
            reply.token = g.token
            reply.text = m.labels[g.token] if m.input.vocab is None else m.input.vocab[g.token]
        if g.value is not None:
            reply.value.extend(g.value.tolist())
        return reply
