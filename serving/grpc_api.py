"""Our gRPC API (``rnnserve.v1.RnnServe``): translates messages to ``Engine`` calls and back.

No behaviour lives here beyond translation: inputs are decoded with ``serving.codec`` against the
model's manifest, outputs are put in the model's own terms with ``codec.format_output``, and errors
are mapped with ``serving.errors.grpc_status`` and sent as a rich status (``google.rpc.Status`` with
an ``ErrorInfo`` carrying the reason and, where it helps, a ``BadRequest`` naming the field or the
expected step index).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
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
from serving.engine import (
    CheckedStep,
    Engine,
    Generated,
    SessionInfo,
    StepResult,
    check_predict_rows,
)
from serving.errors import (
    InvalidInput,
    PayloadTooLarge,
    RnnServeError,
    SessionNotFound,
    StepOutOfOrder,
    grpc_status,
)
from serving.manifest import Manifest
from serving.metrics import Metrics

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RnnServe"].full_name  # "rnnserve.v1.RnnServe"
DEFAULT_TOP_K = 5
MAX_STEPMANY_ENTRIES = 4096
MAX_ERROR_MESSAGE = 1024  # characters of a status message (see _clipped)
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024  # gRPC's send limit; the server passes its own
ENTRY_ERROR_BYTES = 256  # a StepMany entry's error, as counted in a reply's size bound
FEW_ROWS = 4  # OutputRows converts up to this many rows in plain Python, more with NumPy


def own_session(session_id: str) -> str:
    """A session id as this API may address it: only ids the server issued (``token_urlsafe``,
    never a colon). Client-chosen ids of other transports (OIP's ``oip:<model>:<sequence_id>``)
    are guessable by design, so from here they do not exist."""
    if ":" in session_id:
        raise SessionNotFound(f"unknown session {session_id[:64]!r}")
    return session_id


def own_session_ids(session_ids: Sequence[str]) -> tuple[Sequence[str], dict[int, Exception]]:
    """``own_session`` for many ids: the ids to look up ("" in place of another transport's id,
    so that session is neither found nor touched) and each such id's error by position."""
    if ":" not in "".join(session_ids):  # the common case: one scan, no copy
        return session_ids, {}
    errors: dict[int, Exception] = {}
    for pos, session_id in enumerate(session_ids):
        try:
            own_session(session_id)
        except SessionNotFound as err:
            errors[pos] = err
    return [("" if pos in errors else i) for pos, i in enumerate(session_ids)], errors


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


def error_message(err: BaseException) -> pb.Error:
    """The per-entry error of StepMany."""
    out = pb.Error(
        code=grpc_status(err).name,
        reason=getattr(err, "reason", "INTERNAL"),
        message=_client_message(err),
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
        values = np.asarray(list(inp.features.values), dtype=np.float32)  # see _decode_one
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


def session_message(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        version=info.version,
        expires_at=info.expires_at,
        next_step_index=info.next_step_index,
    )


def _rows_by_model(
    requests: Sequence[pb.StepRequest],
    outcomes: list[StepResult | Exception | None],
    where: list[int],
    manifests: list[Manifest],
) -> dict[int, tuple[OutputRows, int, int]]:
    """For each answered entry (by position): its model's ``OutputRows`` and its rows there.
    Every answered row of one model (and top_k) is converted at once."""
    groups: dict[tuple[int, int], tuple[Manifest, list[int]]] = {}  # (id(manifest), top_k)
    for pos, m in zip(where, manifests, strict=True):
        if isinstance(outcomes[pos], StepResult):
            top_k = (requests[pos].top_k or DEFAULT_TOP_K) if m.output.kind == "next_token" else 0
            groups.setdefault((id(m), top_k), (m, []))[1].append(pos)
    located: dict[int, tuple[OutputRows, int, int]] = {}
    for (_, top_k), (m, positions) in groups.items():
        ys = [outcomes[pos].y for pos in positions]  # type: ignore[union-attr]  # each (T, O)
        rows = OutputRows(m, np.concatenate(ys), top_k or DEFAULT_TOP_K)
        start = 0
        for pos, y in zip(positions, ys, strict=True):
            located[pos] = (rows, start, start + len(y))
            start += len(y)
    return located


def _plain_steps(features: int, values: int, steps: int, limit: int) -> int:
    """T of a well-formed feature input (``values`` numbers, ``steps`` given or 0), else 0."""
    steps = steps or (values // features if features else 0)
    return steps if features and values == steps * features and 1 <= steps <= limit else 0


# ---- the servicer -----------------------------------------------------------------------------


class RnnServeServicer(pb_grpc.RnnServeServicer):
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics | None = None,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_reply_bytes = max_reply_bytes  # a StepMany reply past it is refused up front

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
        self.engine.close_session(own_session(request.session_id))
        return pb.CloseSessionResponse()

    @_rpc
    async def ResetSession(self, request, context):
        return session_message(self.engine.reset_session(own_session(request.session_id)))

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
        from serving.grpc_packed import step_packed  # it builds on this module: import it late

        async for message in request_iterator:
            if message.HasField("packed"):
                yield await step_packed(
                    self.engine, message, self._entry_error, self.max_reply_bytes
                )
                continue
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
        found: dict[int, tuple[Any, Any]] = {}  # position -> (session, runtime)
        ids, foreign = own_session_ids([req.session_id for req in requests])
        for pos, hit in enumerate(e.lookup_many(ids)):
            if type(hit) is tuple:
                found[pos] = hit
            else:  # SessionExpired / SessionNotFound
                outcomes[pos] = foreign.get(pos, hit)
        xs = self._decode_entries(requests, found, outcomes)
        checked: list[CheckedStep] = []
        where: list[int] = []  # position in the message of each checked step, in message order
        for pos, (sess, rt) in found.items():
            if outcomes[pos] is None:
                req = requests[pos]
                index = req.step_index if req.HasField("step_index") else None
                checked.append((sess, rt, xs[pos], index))
                where.append(pos)
        check_reply_bytes(
            self._entries_reply_bytes(requests, checked, where, outcomes), self.max_reply_bytes
        )
        expires_at = time.time() + e.sessions.ttl_s  # the lookups just pushed the deadlines back
        for pos, outcome in zip(where, await e.step_many(checked), strict=True):
            outcomes[pos] = outcome
        manifests = [c[1].manifest for c in checked]
        return self._many_replies(requests, outcomes, where, manifests, expires_at)

    @staticmethod
    def _entries_reply_bytes(
        requests: Sequence[pb.StepRequest],
        checked: list[CheckedStep],
        where: list[int],
        outcomes: list[StepResult | Exception | None],
    ) -> int:
        """Upper bound of a StepMany reply's size: the checked steps' outputs, every entry's
        session id (twice), the errors already known."""
        total = sum(2 * len(r.session_id) + 32 for r in requests)
        total += ENTRY_ERROR_BYTES * sum(o is not None for o in outcomes)
        for (_, rt, x, _), pos in zip(checked, where, strict=True):
            total += len(x) * output_bytes_per_step(rt.manifest, requests[pos].top_k)
        return total

    def _many_replies(
        self,
        requests: Sequence[pb.StepRequest],
        outcomes: list[StepResult | Exception | None],
        where: list[int],
        manifests: list[Manifest],
        expires_at: float,
    ) -> pb.StepManyResponse:
        located = _rows_by_model(requests, outcomes, where, manifests)
        response = pb.StepManyResponse()
        add = response.results.add
        for pos, (req, outcome) in enumerate(zip(requests, outcomes, strict=True)):
            sid = req.session_id
            if isinstance(outcome, StepResult):
                reply = add(session_id=sid).reply
                reply.session_id = sid
                reply.step_index = outcome.step_index
                reply.expires_at = expires_at
                rows, start, stop = located[pos]
                rows.fill(reply, start, stop)
            else:
                assert outcome is not None
                add(session_id=sid, error=self._entry_error(outcome))
        return response

    def _decode_entries(
        self,
        requests: Sequence[pb.StepRequest],
        found: dict[int, tuple[Any, Any]],
        outcomes: list[StepResult | Exception | None],
    ) -> dict[int, np.ndarray]:
        """Every found entry's input → x; an entry that does not decode gets its error in
        ``outcomes``. Feature inputs of one model are decoded together (one NumPy call)."""
        xs: dict[int, np.ndarray] = {}
        features: dict[int, list[int]] = {}  # id(runtime) -> positions with plain feature input
        for pos, (_, rt) in found.items():
            inp = requests[pos].input
            if rt.manifest.input.kind == "features" and inp.WhichOneof("data") == "features":
                features.setdefault(id(rt), []).append(pos)
                continue
            try:
                xs[pos] = decode_input(rt.manifest, inp, self.engine.input_limit(rt.manifest))
            except Exception as err:
                outcomes[pos] = err
        for positions in features.values():
            m = found[positions[0]][1].manifest
            self._decode_features(m, [requests[p].input for p in positions], positions, xs)
            for pos in positions:
                if pos not in xs:  # the fast path refused it: decode alone for the exact error
                    try:
                        xs[pos] = decode_input(m, requests[pos].input, self.engine.input_limit(m))
                    except Exception as err:
                        outcomes[pos] = err
        return xs

    def _decode_features(
        self, m: Manifest, inputs: list[pb.Input], positions: list[int], xs: dict[int, np.ndarray]
    ) -> None:
        """Well-formed feature inputs of one model → (T, F) views of one float32 array. What this
        fast path does not accept is left out of ``xs`` (``decode_input`` then says why)."""
        f = int(m.input.features or 0)
        limit = self.engine.input_limit(m)
        good: list[tuple[int, int, int]] = []  # (position, start, steps)
        values = []
        start = 0
        for pos, inp in zip(positions, inputs, strict=True):
            v = inp.features.values
            steps = _plain_steps(f, len(v), inp.features.steps, limit)
            if steps:
                good.append((pos, start, steps))
                values.append(v)
                start += len(v)
        flat = np.fromiter(itertools.chain.from_iterable(values), np.float32, start)
        finite = bool(np.isfinite(flat).all())
        for pos, begin, steps in good:
            x = flat[begin : begin + steps * f].reshape(steps, f)  # (T, F)
            if finite or np.isfinite(x).all():
                xs[pos] = x

    def _decode_one(self, m: Manifest, inp: pb.Input) -> np.ndarray:
        """``decode_input`` with a short path for the common case (well-formed features)."""
        limit = self.engine.input_limit(m)
        if m.input.kind == "features" and inp.WhichOneof("data") == "features":
            f = int(m.input.features or 0)
            # a list first: NumPy reads protobuf's repeated container one item at a time through
            # the sequence protocol (~4 µs for 10 floats); list() copies it in C, then NumPy reads
            # the list in ~0.6 µs
            v = list(inp.features.values)
            steps = _plain_steps(f, len(v), inp.features.steps, limit)
            # the sum of float32 values cannot overflow a Python float, so it is finite exactly
            # when every value is (NaN and ±inf propagate): one C loop, no array yet
            if steps and math.isfinite(sum(v)):
                return np.array(v, dtype=np.float32).reshape(steps, f)  # (T, F)
        return decode_input(m, inp, limit)  # anything else, and the exact error

    def _entry_error(self, err: Exception) -> pb.Error:
        if not isinstance(err, RnnServeError):
            log.error("StepMany entry failed: %r", err)
        self._count("StepMany.entry", grpc_status(err).name)
        return error_message(err)

    async def _step(self, session_id: str, request: pb.StepRequest) -> pb.StepResponse:
        e = self.engine
        sess, rt = e.lookup(own_session(session_id))
        m = rt.manifest
        x = self._decode_one(m, request.input)
        index = request.step_index if request.HasField("step_index") else None
        result = await e.step_checked(sess, rt, x, index)
        reply = pb.StepResponse(
            session_id=session_id, step_index=result.step_index, expires_at=e.expires_at(sess)
        )
        OutputRows(m, result.y, request.top_k or DEFAULT_TOP_K).fill(reply)
        return reply

    # generation
    @_stream
    async def Generate(self, request, context):
        e = self.engine
        m = e.session_manifest(own_session(request.session_id))
        prompt = None
        if request.HasField("prompt") and request.prompt.WhichOneof("data"):
            prompt = decode_input(m, request.prompt, e.input_limit(m))
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
        check_predict_rows(len(request.inputs))  # before decoding: a huge count is refused at once
        rows = [decode_input(m, inp) for inp in request.inputs]
        y = await e.predict(m.name, m.version, rows)  # (B, O)
        top_k = request.top_k or DEFAULT_TOP_K
        reply = pb.PredictResponse(model=m.name, version=m.version)
        OutputRows(m, y, top_k).add_to(reply.outputs)
        return reply

    # bookkeeping
    def _count(self, method: str, code: str) -> None:
        if self.metrics is not None:
            self.metrics.on_request(method, code)

    async def _failed(self, method: str, context: Any, err: Exception) -> None:
        if not isinstance(err, RnnServeError):
            log.exception("%s failed", method)
        self._count(method, grpc_status(err).name)
        await _abort(context, err)


def output_bytes_per_step(m: Manifest, top_k: int = 0) -> int:
    """Upper bound of one time step's ``Output`` (and its share of the reply's ``text``) in a
    reply, protobuf framing included: what a step costs in a reply's size."""
    floats = 4 * m.output.size + 6  # packed floats: tag, length, values
    if m.output.kind == "regression":
        return 6 + 2 * floats  # raw and value
    labels = m.labels
    longest = max((len(label.encode()) for label in labels), default=0)
    named = longest + 3 + 6  # label or char, and index
    if m.output.kind == "classification":
        return 6 + floats + named + 4 * len(labels) + 6  # + probabilities
    candidates = min(top_k or DEFAULT_TOP_K, len(labels))
    return 6 + floats + named + candidates * (longest + 3 + 6 + 5 + 3) + longest  # + top_k, text


def check_reply_bytes(estimate: int, limit: int) -> None:
    """Refuse a StepMany message before any step runs if its reply could exceed what gRPC may
    send: gRPC checks only after the reply is built, when the sessions have moved on."""
    if estimate > limit:
        raise PayloadTooLarge(
            f"the reply to this StepMany message would take up to {estimate} bytes; the limit "
            f"is {limit} bytes: send fewer sessions or time steps per message",
            field="steps",
        )


def add_to_server(
    server: grpc.aio.Server,
    engine: Engine,
    metrics: Metrics | None = None,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> str:
    servicer = RnnServeServicer(engine, metrics, max_reply_bytes)
    pb_grpc.add_RnnServeServicer_to_server(servicer, server)
    return SERVICE_NAME
