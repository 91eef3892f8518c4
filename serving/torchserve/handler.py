"""The TorchServe handler: a thin adapter from JSON requests to the serving core and back.

TorchServe gathers concurrent ``POST /predictions/<model>`` calls into one batch and calls
``handle(data, context)`` with one entry per request. Everything that is not about HTTP bodies lives
in the core and is shared with the gRPC APIs: manifest loading and checksums (serving.manifest), the
graphs (serving.backends), validation and formatting (serving.codec), statuses (serving.errors).

Request bodies (one sequence per request, ``Content-Type: application/json``)::

    {"inputs": [[f1..fF], ...]}          T steps of F features
    {"inputs": [...], "horizon": H}      regression models whose output is their next input (sine):
                                         H values forecast by feeding predictions back
    {"text": "..."} or {"tokens": [...]} char models: the next character's distribution
    {"text": "...", "generate": N}       ... and N characters generated greedily
    "top_k": K                           char models: how many candidates to list (default 5)

A field this model does not read is refused with a 400 that names it and lists the fields the
model accepts, never ignored: another kind's input (``"text"`` to a feature model, ``"inputs"`` to
a char model), ``"top_k"``/``"generate"`` to a model without characters, ``"text"`` and
``"tokens"`` together, or a key of no model at all (``"temperature"``: HTTP generation is greedy).

TorchServe's default answers one failure with an error for the whole batch. Here each request is
parsed and checked on its own: a bad one gets its own 4xx and a JSON error, and the rest of the
batch is answered normally (``context.set_response_status(code, phrase, idx)``).

TorchServe imports this file from the .mar as the top-level module ``handler``; it needs the
``serving`` package installed in the Python that runs TorchServe (the project's venv or image).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np

try:
    from serving import codec, errors
    from serving.backends import Backend, initial_states, make_backend
    from serving.errors import InvalidInput, NotStreamable, PayloadTooLarge, RnnServeError
    from serving.manifest import Manifest, load_manifest
except ImportError as e:  # TorchServe would hide an ImportError behind "no default handler"
    raise RuntimeError(
        f"the rnnserve handler cannot import the `serving` package ({e}); run TorchServe with the "
        "Python that has rnnserve installed (`rnnserve torchserve start` does)"
    ) from e

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_TOP_K = 5
FIELDS = ("inputs", "text", "tokens", "generate", "horizon", "top_k")
BATCH_SIZE_HEADER = "x-rnnserve-batch-size"  # how many requests shared this one's batch
MAX_KEYS_NAMED = 5  # unknown keys an error names; the rest are counted
MAX_KEY_CHARS = 40  # each named key is cut to this


@dataclass(frozen=True)
class Request:
    """One parsed, validated request."""

    x: np.ndarray  # (T, F) float32 features or (T,) int64 token ids
    rollout: int = 0  # steps past the input: characters to generate or values to forecast
    top_k: int = DEFAULT_TOP_K


@dataclass(frozen=True)
class Prediction:
    y: np.ndarray  # (O,) the head's output after the last input step
    top_k: int = DEFAULT_TOP_K
    continuation: np.ndarray | None = None  # (rollout,) token ids or (rollout, F) forecast values


Outcome = Prediction | BaseException


class RnnHandler:
    """initialize → preprocess → inference → postprocess, as TorchServe's handlers split it."""

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None

    def initialize(self, context: Any) -> None:
        """Load the model the .mar carries: its files sit flat beside the manifest."""
        model_dir = Path(context.system_properties["model_dir"])
        settings = (getattr(context, "model_yaml_config", None) or {}).get("handler", {})
        self.manifest: Manifest = load_manifest(model_dir, verify=True)
        self.backend: Backend = make_backend(
            self.manifest,
            model_dir,
            settings.get("backend", "onnx"),
            int(settings.get("threads", 1)),
        )
        self.max_body_bytes = int(settings.get("max_body_bytes", DEFAULT_MAX_BODY_BYTES))
        self.context = context
        self.initialized = True
        log.info("loaded %s v%s from %s", self.manifest.name, self.manifest.version, model_dir)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        self.context = context
        return self.postprocess(self.inference(self.preprocess(data)))

    # ---- preprocess: bodies → validated requests, or the error for that request alone --------
    def preprocess(self, data: list[dict[str, Any]]) -> list[Request | Exception]:
        parsed: list[Request | Exception] = []
        for row in data:
            try:
                parsed.append(parse_request(self.manifest, read_body(row, self.max_body_bytes)))
            except RnnServeError as e:
                parsed.append(e)
            except Exception as e:  # a parsing bug must cost this request a 500, not the batch
                log.exception("%s: unexpected error parsing a request", self.manifest.name)
                parsed.append(e)
        return parsed

    # ---- inference: one padded sequence batch, one batched rollout --------------------------
    def inference(self, requests: list[Request | Exception]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [r if isinstance(r, Exception) else None for r in requests]
        plain = [i for i, r in enumerate(requests) if isinstance(r, Request) and not r.rollout]
        rolling = [i for i, r in enumerate(requests) if isinstance(r, Request) and r.rollout]
        for group, run in ((plain, self._sequence), (rolling, self._rollout)):
            if not group:
                continue
            try:
                for i, outcome in zip(group, run([requests[i] for i in group]), strict=True):
                    outcomes[i] = outcome
            except Exception as e:  # a failure of the group's graph call is every member's error
                log.exception("%s: inference failed for %d", self.manifest.name, len(group))
                for i in group:
                    outcomes[i] = e
        return outcomes  # type: ignore[return-value]  # every slot is filled above

    def _sequence(self, requests: list[Request]) -> list[Prediction]:
        """The sequence graph with lengths: each row's result equals running it alone."""
        x, lengths = codec.batch_sequences([r.x for r in requests])  # (B, T_max, ...), (B,)
        y = self.backend.sequence(x, lengths)  # (B, O)
        return [Prediction(y[b], r.top_k) for b, r in enumerate(requests)]

    def _rollout(self, requests: list[Request]) -> list[Prediction]:
        """Run each input through the step graph, then continue every row together by feeding
        each step's output back as the next input (argmax character or predicted value)."""
        m = self.manifest
        starts = [self._prefix(r) for r in requests]
        last = np.stack([y for y, _ in starts])  # (B, O)
        per_state = zip(*(s for _, s in starts), strict=True)  # state i of every row
        states = [np.concatenate(parts, axis=1) for parts in per_state]  # [(L, B, H)]
        steps = max(r.rollout for r in requests)
        fed: list[np.ndarray] = []  # per rollout step, (B, 1) ids or (B, 1, F) values
        for k in range(steps):
            fed.append(feedback(m, last))
            if k + 1 < steps:
                y, states = self.backend.step(fed[-1], states)  # (B, 1, O)
                last = y[:, -1]
        rolled = np.concatenate(fed, axis=1)  # (B, steps) ids or (B, steps, F) values
        return [
            Prediction(y0, r.top_k, rolled[b, : r.rollout])
            for b, ((y0, _), r) in enumerate(zip(starts, requests, strict=True))
        ]

    def _prefix(self, request: Request) -> tuple[np.ndarray, list[np.ndarray]]:
        """One request's input through the step graph alone (its length is its own)."""
        y, states = self.backend.step(request.x[None], initial_states(self.manifest, 1))
        return y[0, -1], states  # (O,), [(L, 1, H)]

    # ---- postprocess: the model's own terms, or the request's own error --------------------
    def postprocess(self, outcomes: list[Outcome]) -> list[str]:
        replies = []
        for idx, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException):
                body = self._error_reply(idx, outcome)
            else:
                body = self._reply(outcome)
            self._set_header(idx, "content-type", "application/json")
            self._set_header(idx, BATCH_SIZE_HEADER, str(len(outcomes)))
            replies.append(json.dumps(body))
        return replies

    def _reply(self, p: Prediction) -> dict[str, Any]:
        m = self.manifest
        body = {"model": m.name, "version": m.version}
        body.update(codec.format_output(m, p.y, top_k=p.top_k))
        if p.continuation is not None and m.output.kind == "next_token":
            body["generated"] = "".join(m.labels[int(i)] for i in p.continuation)
        elif p.continuation is not None:  # (n, F): plain values when each step is one value
            values = [[codec.float32_text(v) for v in row] for row in p.continuation]
            body["forecast"] = [row[0] for row in values] if m.input.features == 1 else values
        return body

    def _error_reply(self, idx: int, err: BaseException) -> dict[str, Any]:
        status = errors.http_status(err)
        if self.context is not None:
            self.context.set_response_status(status, HTTPStatus(status).phrase, idx)
        body = errors.to_json(err)
        body["status"] = status
        return body

    def _set_header(self, idx: int, key: str, value: str) -> None:
        if self.context is not None and getattr(self.context, "request_processor", None):
            self.context.set_response_header(idx, key, value)


# ---- request parsing (HTTP-specific: JSON bodies; the checks themselves are the codec's) -------


def read_body(row: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """TorchServe hands the body over already JSON-decoded (application/json), or as bytes/str
    when decoding failed or another content type was sent; this returns the JSON object."""
    body = row.get("body", row.get("data"))
    if body is None or body == b"" or body == "":
        raise InvalidInput(
            'no JSON body: POST a JSON object such as {"inputs": [[0.5], [-0.2]]} '
            "with Content-Type: application/json",
            field="body",
        )
    if isinstance(body, bytes | bytearray):
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body of {len(body)} bytes; the limit is {max_bytes}")
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInput(f"request body is not UTF-8 text: {e}", field="body") from e
    if isinstance(body, str):
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"request body of {len(body)} chars; the limit is {max_bytes}")
        try:
            body = json.loads(body)
        except json.JSONDecodeError as e:
            raise InvalidInput(f"request body is not valid JSON: {e}", field="body") from e
        except RecursionError as e:  # "[[[[..." a few thousand deep: the decoder's stack ends
            raise InvalidInput("request body is nested too deeply", field="body") from e
    if not isinstance(body, dict):
        raise InvalidInput(
            f"request body must be a JSON object, got {type(body).__name__}", field="body"
        )
    return body


def parse_request(m: Manifest, body: dict[str, Any]) -> Request:
    check_fields(m, body)
    x = decode_input(m, body)
    rollout = _rollout_steps(m, body)
    top_k = _count(body, "top_k", len(m.labels)) if "top_k" in body else DEFAULT_TOP_K
    return Request(x=x, rollout=rollout, top_k=top_k)


def check_fields(m: Manifest, body: dict[str, Any]) -> None:
    """Refuse every key this model would not read: a client that sends "text" to a feature model
    or "top_k" to a classifier must learn so, not get an answer to a question it did not ask."""
    fields = accepted_fields(m)
    accepted = ", ".join(fields)
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(
            f"unknown field(s) {name_a_few(unknown)}; {m.name} accepts {accepted}",
            field=_shortened(unknown[0]),
        )
    misplaced = [name for name in FIELDS if name in body and name not in fields]
    if misplaced:
        name = misplaced[0]
        raise InvalidInput(f"{misplaced_reason(m, name)}; {m.name} accepts {accepted}", field=name)
    if "text" in body and "tokens" in body:  # one sequence per request: which would it be?
        raise InvalidInput(
            f'send "text" or "tokens", not both: {m.name} reads one sequence per request',
            field="tokens",
        )


def name_a_few(keys: list[str]) -> str:
    """The first few keys, each cut short: a body of 50,000 keys (or one 1 MB key) must not come
    back as a 500 kB error."""
    shown = ", ".join(repr(_shortened(k)) for k in keys[:MAX_KEYS_NAMED])
    rest = len(keys) - MAX_KEYS_NAMED
    return f"{shown} and {rest} more" if rest > 0 else shown


def _shortened(key: str) -> str:
    return key if len(key) <= MAX_KEY_CHARS else key[: MAX_KEY_CHARS - 1] + "…"


def misplaced_reason(m: Manifest, name: str) -> str:
    """Why a field of another model kind does not apply here (the codec's words for inputs)."""
    if name in ("text", "tokens"):
        return f'"{name}" is for text/token models: {m.name} takes feature vectors, not text/tokens'
    if name == "inputs":
        return f'"inputs" is for feature models: {m.name} takes text/tokens, not feature vectors'
    if name == "horizon":
        return f'"horizon" is for forecasting models (sine), and {m.name} is not one'
    return f'"{name}" is for character models, and {m.name} is not one'  # generate, top_k


def decode_input(m: Manifest, body: dict[str, Any]) -> np.ndarray:
    if m.input.kind == "features":
        if "inputs" not in body:
            f = m.input.features
            raise InvalidInput(
                f'missing field "inputs": {m.name} expects {{"inputs": [[f1..f{f}], ...]}} '
                f"(T steps of {f} features)",
                field="inputs",
            )
        if body["inputs"] == []:
            codec.check_steps(m, 0)  # say "empty", not "wrong shape", whatever F is
        return codec.decode_features(m, body["inputs"])
    if "text" in body:
        return codec.decode_text(m, body["text"])
    if "tokens" in body:
        return codec.decode_tokens(m, body["tokens"])
    raise InvalidInput(
        f'missing field "text": {m.name} expects {{"text": "..."}} (or "tokens": [ids])',
        field="text",
    )


def accepted_fields(m: Manifest) -> list[str]:
    """The body keys this model reads; every other key is refused (check_fields)."""
    inputs = ["text", "tokens"] if m.input.kind == "tokens" else ["inputs"]
    if m.output.kind == "next_token":  # characters: generate them, list the top candidates
        return [*inputs, "generate", "top_k"]
    return [*inputs, "horizon"] if can_forecast(m) else inputs


def can_forecast(m: Manifest) -> bool:
    """A regression model whose output is shaped like its input can be fed its own predictions."""
    return m.output.kind == "regression" and m.output.size == m.input.features


def _rollout_steps(m: Manifest, body: dict[str, Any]) -> int:
    name = "generate" if "generate" in body else "horizon" if "horizon" in body else None
    if name is None:
        return 0
    # check_fields has already refused "generate"/"horizon" on a model that cannot take it
    if not m.streamable:
        raise NotStreamable(f"{m.name} reads whole sequences and cannot continue one")
    return _count(body, name, m.input.max_steps)


def _count(body: dict[str, Any], name: str, limit: int) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        message = f'"{name}" must be an integer in [1, {limit}], not {value!r}'
        raise InvalidInput(message, field=name)
    return value


def feedback(m: Manifest, last: np.ndarray) -> np.ndarray:
    """Last outputs (B, O) → next step's inputs: argmax ids (B, 1) or the values (B, 1, F)."""
    if m.output.kind == "next_token":
        return last.argmax(axis=-1).astype(np.int64)[:, None]
    return last.astype(np.float32)[:, None, :]


# ---- TorchServe's entry point -----------------------------------------------------------------

_service = RnnHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[str] | None:
    """Called by TorchServe: first with ``data=None`` to load, then once per batch."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
