"""The Open Inference Protocol (KServe v2 gRPC) over the Engine, with Triton's sequence extension.

A thin adapter: it turns ``inference.*`` messages into Engine calls and back, validates inputs
with ``serving.codec`` and answers errors through ``serving.errors.grpc_status``. docs/oip.md
describes the wire contract; the short version:

* request parameter ``sequence_id`` (int64, uint64 or string; 0 / "" = none) with
  ``sequence_start`` / ``sequence_end`` steps an Engine session ``oip:<model>:<sequence_id>``:
  start opens it with fresh state (restarting it if open), every request runs its time steps,
  end closes it after a successful step.
* no ``sequence_id`` = stateless: streamable models run the rows from fresh state through the step
  graph (outputs per time step, exactly like a one-request sequence); non-streamable
  (bidirectional) models run the sequence graph via ``Engine.predict``.
* ``ModelStreamInfer`` answers one reply per request, in request order; a bad request gets a
  reply with ``error_message`` and the stream goes on. Requests of different sequences run
  concurrently (so the scheduler batches them); requests of one sequence run in arrival order.

Why a private descriptor pool: ``tritonclient`` registers the same full names
(``inference.ModelInferRequest``, ...) from its own ``grpc_service.proto`` in protobuf's default
pool, and two files defining one symbol cannot share a pool. Importing our generated
``grpc_service_pb2`` next to tritonclient (tests, a gateway embedding both) would fail with
"duplicate symbol", so this module builds its message classes from the generated file's
serialized descriptor in a pool of its own and never imports that module.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import math
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving import codec
from serving.backends import LoadedModel, OnnxBackend, TorchScriptBackend
from serving.engine import MAX_PREDICT_ROWS, StepCounters
from serving.errors import (
    InvalidInput,
    NotStreamable,
    PayloadTooLarge,
    RnnServeError,
    SessionExpired,
    SessionNotFound,
    grpc_status,
)
from serving.manifest import Manifest
from serving.oip_stats import ModelRequestStats, RequestClock, RequestStatistics
from serving.predict_batcher import MAX_PADDED_STEPS
from serving.scheduler import step_timing
from serving.security import current_identity

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "rnnserve"
EXTENSIONS = ("sequence", "classification", "model_configuration", "statistics")
INPUT_ALIAS = "INPUT"  # Triton examples' customary name; accepted besides the manifest's name
TEXT_INPUT = "text"  # BYTES, one UTF-8 string: char models only
OUTPUT_Y = "y"  # FP32 raw head output
OUTPUT_PROBS = "probabilities"  # FP32, classifiers and char models
OUTPUT_LABEL = "label"  # BYTES, the most likely label / next character
MAX_SEQUENCE_ID_LENGTH = 200  # string ids; the session id adds "oip:<model>:"
MAX_IN_FLIGHT_PER_STREAM = 1024  # unanswered requests one stream may hold before we stop reading
MAX_ERROR_MESSAGE = 1024  # characters of a status message, as rnnserve.v1 (see _clipped)
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024  # gRPC's send limit; the server sets its own
FLOAT_TEXT_BYTES = 47  # f"{v:f}" of a float32: "-", 39 digits of 3.4e38, ".", 6 decimals

_GENERATED_DIR = Path(__file__).parent / "_proto" / "inference"
_GENERATED = _GENERATED_DIR / "grpc_service_pb2.py"
# grpc_service.proto imports model_config.proto: the pool needs the imported file first
_GENERATED_FILES = (_GENERATED_DIR / "model_config_pb2.py", _GENERATED)


# ---- messages in a private pool ------------------------------------------------------------


def _serialized_descriptor(generated: Path = _GENERATED) -> bytes:
    """The FileDescriptorProto bytes protoc embedded in the generated module (read, not run)."""
    for node in ast.walk(ast.parse(generated.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            return ast.literal_eval(node.args[0])
    raise ImportError(f"{generated}: no serialized descriptor; run `make protos`")


def _load_messages() -> tuple[SimpleNamespace, descriptor_pool.DescriptorPool]:
    """Every top-level message of the generated files, plus their top-level enums' values
    (``pb.TYPE_FP32``)."""
    pool = descriptor_pool.DescriptorPool()
    names: dict[str, Any] = {}
    for generated in _GENERATED_FILES:
        serialized = _serialized_descriptor(generated)
        file = pool.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
        for name, descriptor in file.message_types_by_name.items():
            names[name] = message_factory.GetMessageClass(descriptor)
        for enum in file.enum_types_by_name.values():
            names.update({v.name: v.number for v in enum.values})
    return SimpleNamespace(**names), pool


pb, DESCRIPTOR_POOL = _load_messages()


# ---- requests -> arrays --------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceControl:
    """Triton's sequence parameters of one request; ``sequence_id`` None = stateless."""

    sequence_id: int | str | None
    start: bool
    end: bool


def sequence_control(request: Any) -> SequenceControl:
    params = request.parameters
    seq: int | str | None = None
    if "sequence_id" in params:
        p = params["sequence_id"]
        kind = p.WhichOneof("parameter_choice")
        if kind not in ("int64_param", "uint64_param", "string_param"):
            raise InvalidInput(
                f"parameter sequence_id must be an integer or a string, got {kind}",
                field="sequence_id",
            )
        seq = getattr(p, kind) or None  # 0 and "" mean "no sequence", as in Triton
        if isinstance(seq, str) and len(seq) > MAX_SEQUENCE_ID_LENGTH:
            raise InvalidInput(
                f"sequence_id is {len(seq)} characters; at most {MAX_SEQUENCE_ID_LENGTH}",
                field="sequence_id",
            )
    return SequenceControl(
        seq, _bool_param(params, "sequence_start"), _bool_param(params, "sequence_end")
    )


def _bool_param(params: Any, name: str) -> bool:
    if name not in params:
        return False
    p = params[name]
    if p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(f"parameter {name} must be a bool", field=name)
    return p.bool_param


def parse_version(text: str) -> int | None:
    """'' = latest; otherwise a positive integer of at most 18 ASCII digits (``str.isdigit``
    alone also accepts "²", which ``int`` refuses, and ``int`` refuses over 4,300 digits)."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 18) or int(text) < 1:
        shown = text if len(text) <= 64 else text[:64] + "…"
        raise InvalidInput(
            f"model_version must be a positive integer, got {shown!r}", field="version"
        )
    return int(text)


def expected_inputs(m: Manifest) -> str:
    """Human words for what this model takes (used in error messages)."""
    if m.input.kind == "features":
        return f"{m.input.name!r} FP32 [1, T, {m.input.features}]"
    return f"{m.input.name!r} INT64 [1, T] or {TEXT_INPUT!r} BYTES [1] (one UTF-8 string)"


def decode_rows(m: Manifest, request: Any, max_steps: int | None = None) -> list[np.ndarray]:
    """The request's one input tensor → one validated array per batch row: (T, F) or (T,)."""
    tensor, raw = _the_input(m, request)
    if tensor.datatype == "BYTES":
        return [codec.decode_text(m, _one_text(m, tensor, raw), max_steps)]

    def check_dims(shape: list[int]) -> None:
        _check_dims(m, shape, max_steps)

    if m.input.kind == "features":
        arr = _numeric(tensor, raw, {"FP32": "<f4"}, 3, expected_inputs(m), check_dims)
        return [codec.decode_features(m, row, max_steps=max_steps) for row in _rows(arr)]
    int_types = {"INT64": "<i8", "INT32": "<i4"}
    arr = _numeric(tensor, raw, int_types, 2, expected_inputs(m), check_dims)
    return [codec.decode_tokens(m, row, max_steps) for row in _rows(arr)]


def _rows(arr: np.ndarray) -> np.ndarray:
    _check_batch(arr.shape[0])
    return arr


def _check_batch(rows: int) -> None:
    if rows == 0:
        raise InvalidInput("empty input: the batch dimension is 0", field="inputs")
    if rows > MAX_PREDICT_ROWS:  # each stateless row holds a session while it runs
        raise PayloadTooLarge(f"batch of {rows} rows; at most {MAX_PREDICT_ROWS}", field="inputs")


def _check_dims(m: Manifest, shape: list[int], max_steps: int | None) -> None:
    """Each dimension of a numeric input (rank checked) within what the model takes, before the
    values are shaped: one dimension of 0 makes the element count 0 whatever the others say,
    so [0, 2**62, 10] passes the count check, and NumPy cannot shape it."""
    _check_batch(shape[0])
    codec.check_steps(m, shape[1], max_steps)
    if len(shape) == 3 and shape[2] != m.input.features:
        raise codec.feature_count_error(m, shape[1] * shape[2], shape[1])


def _the_input(m: Manifest, request: Any) -> tuple[Any, bytes | None]:
    if len(request.inputs) != 1:
        raise InvalidInput(
            f"{m.name} takes exactly one input tensor, {expected_inputs(m)}; "
            f"got {len(request.inputs)}",
            field="inputs",
        )
    tensor = request.inputs[0]
    names = {m.input.name, INPUT_ALIAS} | ({TEXT_INPUT} if m.input.kind == "tokens" else set())
    if tensor.name not in names:
        raise InvalidInput(
            f"{m.name} has no input {tensor.name!r}; send {expected_inputs(m)}", field="inputs"
        )
    if tensor.datatype == "BYTES" and m.input.kind != "tokens":
        raise InvalidInput(
            f"{m.name} takes numbers, not text: send {expected_inputs(m)}", field="inputs"
        )
    raw = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"{len(request.raw_input_contents)} raw_input_contents for "
                f"{len(request.inputs)} inputs: send one per input",
                field="raw_input_contents",
            )
        raw = request.raw_input_contents[0]
    return tensor, raw


_CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents"}


def _numeric(
    tensor: Any,
    raw: bytes | None,
    dtypes: dict[str, str],
    rank: int,
    what: str,
    check_dims: Callable[[list[int]], None],
) -> np.ndarray:
    """Values of a numeric tensor shaped as declared, checking datatype, rank, count and then
    each dimension (``check_dims``)."""
    if tensor.datatype not in dtypes:
        raise InvalidInput(
            f"input {tensor.name!r} has datatype {tensor.datatype or '(empty)'}; send {what}",
            field="inputs",
        )
    shape = [int(d) for d in tensor.shape]
    if len(shape) != rank or min(shape) < 0:
        raise InvalidInput(f"input {tensor.name!r} has shape {shape}; send {what}", field="inputs")
    count = math.prod(shape)  # exact: np.prod wraps int64, so [2**32, 2**32, 1] counted 0
    dtype = np.dtype(dtypes[tensor.datatype])
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"raw_input_contents holds {len(raw)} bytes; shape {shape} of "
                f"{tensor.datatype} needs {count * dtype.itemsize}",
                field="raw_input_contents",
            )
        values = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD[tensor.datatype]
        # list() first: NumPy reads protobuf's repeated container item by item, ~6x slower
        values = np.asarray(list(getattr(tensor.contents, field)), dtype=dtype)
        if values.size != count:
            raise InvalidInput(
                f"contents.{field} holds {values.size} values; shape {shape} needs {count}",
                field="inputs",
            )
    check_dims(shape)
    return values.reshape(shape)


def _one_text(m: Manifest, tensor: Any, raw: bytes | None) -> str:
    """A BYTES input holding exactly one UTF-8 string (shape [1] or [1, 1])."""
    shape = [int(d) for d in tensor.shape]
    if shape not in ([1], [1, 1]):
        raise InvalidInput(
            f"input {tensor.name!r} must hold one string (shape [1]); got shape {shape}",
            field="inputs",
        )
    # at most 2 parsed: a raw body of a million empty strings is refused without a million loops
    items = _bytes_elements(raw, 2) if raw is not None else tensor.contents.bytes_contents[:2]
    if len(items) != 1:
        got = "no elements" if not items else "more than one element"
        raise InvalidInput(
            f"input {tensor.name!r} must hold one string (shape [1]); got {got}", field="inputs"
        )
    try:
        return items[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"input {tensor.name!r} is not UTF-8: {e}", field="inputs") from e


def _bytes_elements(raw: bytes, at_most: int) -> list[bytes]:
    """Triton's BYTES wire form: each element is a little-endian uint32 length, then the bytes.
    Stops after ``at_most`` elements (the caller only needs to know there are too many)."""
    items, at = [], 0
    while at < len(raw) and len(items) < at_most:
        if at + 4 > len(raw):
            raise InvalidInput("BYTES raw_input_contents ends inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, at)
        if at + 4 + n > len(raw):
            raise InvalidInput("BYTES raw_input_contents is shorter than its length prefix")
        items.append(bytes(raw[at + 4 : at + 4 + n]))
        at += 4 + n
    return items


# ---- arrays -> responses -------------------------------------------------------------------


def output_names(m: Manifest) -> list[str]:
    if m.output.kind == "regression":
        return [OUTPUT_Y]
    return [OUTPUT_Y, OUTPUT_PROBS, OUTPUT_LABEL]


def requested_outputs(request: Any, m: Manifest) -> dict[str, int]:
    """Output name → Triton classification count (0 = the tensor itself), checked up front.

    Every output when the request names none. ``parameters["classification"] = k`` on a requested
    output asks for Triton's classification extension: its top k entries along the last axis as
    BYTES ``"value:index:label"``.
    """
    if not request.outputs:
        return dict.fromkeys(output_names(m), 0)
    wanted = {}
    for out in request.outputs:
        if out.name not in output_names(m):
            raise InvalidInput(
                f"{m.name} has no output {out.name!r}; it has: {', '.join(output_names(m))}",
                field="outputs",
            )
        wanted[out.name] = _class_count(out, m)
    return wanted


def _class_count(out: Any, m: Manifest) -> int:
    if "classification" not in out.parameters:
        return 0
    p = out.parameters["classification"]
    k = p.int64_param if p.WhichOneof("parameter_choice") == "int64_param" else -1
    if k < 1 or out.name == OUTPUT_LABEL:
        raise InvalidInput(
            f"classification on output {out.name!r} needs a positive int64 count and a numeric "
            f"output ({OUTPUT_Y!r} or {OUTPUT_PROBS!r})",
            field="outputs",
        )
    return k


def check_reply_size(
    request: Any, m: Manifest, rows: list[np.ndarray], wanted: dict[str, int], limit: int
) -> None:
    """Refuse, before any work, a request whose reply could not be sent: gRPC checks the size
    only after the whole reply is computed and serialized. The estimate is an upper bound."""
    positions = sum(len(r) for r in rows) if m.streamable else len(rows)  # outputs per tensor
    per_position = sum(_bytes_per_position(m, name, k) for name, k in wanted.items())
    estimate = positions * per_position + len(request.id) + len(request.model_name) + 1024
    if estimate > limit:
        steps = f" × {len(rows[0])} time steps" if m.streamable else ""
        raise PayloadTooLarge(
            f"the reply would take up to {estimate} bytes ({len(rows)} rows{steps} of outputs "
            f"{', '.join(wanted)}); the limit is {limit} bytes: send fewer rows or time steps, "
            "or request fewer outputs",
            field="outputs",
        )


def _bytes_per_position(m: Manifest, name: str, class_count: int) -> int:
    """Bytes one batch row (per time step for streamable models) adds to output ``name``."""
    longest_label = max((len(label.encode()) for label in m.labels or []), default=0)
    if name == OUTPUT_LABEL:
        return 4 + longest_label  # BYTES: length prefix + text
    size = m.output.size if name == OUTPUT_Y else _probabilities_size(m)
    if not class_count:
        return 4 * size  # FP32
    entry = FLOAT_TEXT_BYTES + len(str(size)) + longest_label + 2  # "value:index:label"
    return min(class_count, size) * (4 + entry)


def _probabilities_size(m: Manifest) -> int:
    return 2 if m.output.activation == "sigmoid" else m.output.size


def infer_response(request: Any, m: Manifest, y: np.ndarray, wanted: dict[str, int]) -> Any:
    """y (B, T, O) per time step or (B, O) per sequence → ModelInferResponse, raw form."""
    response = pb.ModelInferResponse(model_name=m.name, model_version=str(m.version), id=request.id)
    # once for both probabilities and label (a request naming no outputs asks for both)
    p = codec.probabilities(m, y) if wanted.keys() - {OUTPUT_Y} else None
    for name, class_count in wanted.items():
        values = _output_values(m, name, y, p)
        if class_count:
            values = _classification(m, values, class_count)
        if values.dtype == object:
            datatype, data = "BYTES", _serialize_bytes(values.reshape(-1))
        else:  # float32 already: no conversion copy
            datatype, data = "FP32", np.asarray(values, dtype="<f4").tobytes()
        response.outputs.add(name=name, datatype=datatype, shape=list(values.shape))
        response.raw_output_contents.append(data)
    return response


def _output_values(m: Manifest, name: str, y: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    if name == OUTPUT_Y:
        return y
    assert p is not None  # computed whenever an output other than y is wanted
    if name == OUTPUT_PROBS:
        return p
    return np.asarray(m.labels, dtype=object)[p.argmax(axis=-1)]


def _classification(m: Manifest, values: np.ndarray, k: int) -> np.ndarray:
    """Top k along the last axis as Triton's "value:index:label" strings (no label if none)."""
    k = min(k, values.shape[-1])
    top = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    labels = m.labels if len(m.labels) == values.shape[-1] else None
    out = np.empty(top.shape, dtype=object)
    for at in np.ndindex(top.shape):
        i = int(top[at])
        value = f"{values[(*at[:-1], i)]:f}:{i}"
        out[at] = f"{value}:{labels[i]}" if labels else value
    return out


def _serialize_bytes(items: Iterable[str]) -> bytes:
    parts = []
    for s in items:
        b = s.encode("utf-8")
        parts += [struct.pack("<I", len(b)), b]
    return b"".join(parts)


def _platform(model: LoadedModel) -> str:
    """Triton's platform names for what actually runs the model."""
    if isinstance(model.backend, OnnxBackend):
        return "onnxruntime_onnx"
    if isinstance(model.backend, TorchScriptBackend):
        return "pytorch_libtorch"
    return SERVER_NAME


def model_metadata(model: LoadedModel, versions: list[int]) -> Any:
    """Tensor signatures with -1 for dynamic dims (batch B, time T)."""
    m = model.manifest
    response = pb.ModelMetadataResponse(
        name=m.name, versions=[str(v) for v in versions], platform=_platform(model)
    )
    if m.input.kind == "features":
        response.inputs.add(name=m.input.name, datatype="FP32", shape=[-1, -1, m.input.features])
    else:
        response.inputs.add(name=m.input.name, datatype="INT64", shape=[-1, -1])
    per_step = [-1, -1] if m.streamable else [-1]  # step outputs are (B, T, .); sequence (B, .)
    response.outputs.add(name=OUTPUT_Y, datatype="FP32", shape=[*per_step, m.output.size])
    if m.output.kind != "regression":
        k = 2 if m.output.activation == "sigmoid" else m.output.size
        response.outputs.add(name=OUTPUT_PROBS, datatype="FP32", shape=[*per_step, k])
        response.outputs.add(name=OUTPUT_LABEL, datatype="BYTES", shape=per_step)
    return response


# ---- Triton's model configuration, statistics and repository index ---------------------------

_CONFIG_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}
_TRITON_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}


def model_config(model: LoadedModel, engine_config: Any) -> Any:
    """Triton's ModelConfig, read off the same signatures as ``model_metadata``: dims leave out
    the batch dimension (max_batch_size > 0), streamable models declare sequence batching."""
    platform = _platform(model)
    config = pb.ModelConfig(
        name=model.manifest.name,
        platform=platform,
        backend=_TRITON_BACKENDS.get(platform, ""),
        version_policy=pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All()),  # the store's all
        max_batch_size=MAX_PREDICT_ROWS,  # rows of one stateless request; a sequence's is 1
        instance_group=[pb.ModelInstanceGroup(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)],
        model_transaction_policy=pb.ModelTransactionPolicy(decoupled=False),
    )
    metadata = model_metadata(model, [])
    for tensor in metadata.inputs:
        config.input.add(**_config_tensor(tensor))
    for tensor in metadata.outputs:
        config.output.add(**_config_tensor(tensor))
    delay_us = round(engine_config.max_queue_delay_ms * 1000)
    if model.manifest.streamable:
        config.sequence_batching.max_sequence_idle_microseconds = round(
            engine_config.session_ttl_s * 1e6
        )
        config.sequence_batching.direct.max_queue_delay_microseconds = delay_us
    else:
        config.dynamic_batching.max_queue_delay_microseconds = delay_us
    return config


def _config_tensor(tensor: Any) -> dict[str, Any]:
    """Metadata shape [B, ...] → config dims [...]; a per-row scalar is dims [1], as in Triton."""
    dims = list(tensor.shape[1:]) or [1]
    return {
        "name": tensor.name,
        "data_type": getattr(pb, _CONFIG_TYPES[tensor.datatype]),
        "dims": dims,
    }


def model_statistics(m: Manifest, requests: ModelRequestStats, steps: StepCounters | None) -> Any:
    """One model version's ModelStatistics: OIP requests (see ``serving.oip_stats``), and as
    execution_count the step scheduler's batches over every API's steps of the model (they share
    its batches; 0 for a model without steps)."""
    stats = pb.ModelStatistics(
        name=m.name,
        version=str(m.version),
        last_inference=requests.last_inference_ms,
        inference_count=requests.inference_count,
    )
    inference = stats.inference_stats
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        d = getattr(requests, name)
        getattr(inference, name).MergeFrom(pb.StatisticDuration(count=d.count, ns=d.ns))
    if steps is not None:
        stats.execution_count = steps.batches
    return stats


def repository_index(models: Iterable[LoadedModel]) -> Any:
    """Every loaded model version, READY (the engine loads all of them before serving)."""
    response = pb.RepositoryIndexResponse()
    for m in sorted((lm.manifest for lm in models), key=lambda m: (m.name, m.version)):
        response.models.add(name=m.name, version=str(m.version), state="READY")
    return response


# ---- the servicer --------------------------------------------------------------------------


def session_id_for(model: str, sequence_id: int | str) -> str:
    """The engine session of a Triton sequence. Sequence ids are chosen by clients, so with
    authentication on each identity has its own namespace (``oip:<identity>:<model>:<id>``;
    identities hold no colon): one caller can neither step nor end another's sequence 7.
    Without authentication every client shares one namespace, as in Triton."""
    identity = current_identity()
    if identity is None:
        return f"oip:{model}:{sequence_id}"
    return f"oip:{identity}:{model}:{sequence_id}"


class GRPCInferenceService:
    """``inference.GRPCInferenceService`` over one Engine (see the module docstring)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.statistics = RequestStatistics()
        self.max_reply_bytes = DEFAULT_MAX_REPLY_BYTES  # refused before computing beyond it

    # -- health and metadata --
    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        # The Engine loads every model before the server starts, so a running server is ready
        # unless it is draining for shutdown.
        return pb.ServerReadyResponse(ready=not self.engine.stopping)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=list(EXTENSIONS)
        )

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.engine.model(request.name, parse_version(request.version))
        except InvalidInput as e:
            await _abort(context, e)
        except RnnServeError:  # unknown model or version: not ready (as Triton answers)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            model = self.engine.model(request.name, parse_version(request.version))
            versions = sorted(
                lm.manifest.version
                for lm in self.engine.models()
                if lm.manifest.name == model.manifest.name
            )
            return model_metadata(model, versions)
        except Exception as e:
            await _abort(context, e)

    # -- Triton's extensions: configuration, statistics, repository index --
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            model = self.engine.model(request.name, parse_version(request.version))
            return pb.ModelConfigResponse(config=model_config(model, self.engine.config))
        except Exception as e:
            await _abort(context, e)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        """Empty name: every model; empty version: every version of the named model(s)."""
        try:
            response = pb.ModelStatisticsResponse()
            for m in self._models_named(request.name, request.version):
                stats = self.statistics.snapshot(m.name, m.version)
                steps = self.engine.step_counters(m.name, m.version)
                response.model_stats.append(model_statistics(m, stats, steps))
            return response
        except Exception as e:
            await _abort(context, e)

    def _models_named(self, name: str, version: str) -> list[Manifest]:
        if name and version:
            return [self.engine.model(name, parse_version(version)).manifest]
        if name:
            self.engine.model(name)  # NOT_FOUND for an unknown name
        if version:
            raise InvalidInput("model statistics of a version need the model's name", "version")
        manifests = [lm.manifest for lm in self.engine.models()]
        found = [m for m in manifests if not name or m.name == name]
        return sorted(found, key=lambda m: (m.name, m.version))

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        return repository_index(self.engine.models())

    # -- inference --
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            return await self.infer(request)
        except Exception as e:
            await _abort(context, e)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Replies in request order; a reply's error never ends the stream. A message that does
        not parse does: the requests before it are answered, then the stream fails with
        INVALID_ARGUMENT (the bytes after it cannot be read as messages)."""
        replies: asyncio.Queue[asyncio.Task | InvalidInput | None] = asyncio.Queue(
            MAX_IN_FLIGHT_PER_STREAM
        )
        reader = asyncio.create_task(self._read_stream(requests, replies))
        try:
            while (task := await replies.get()) is not None:
                if isinstance(task, InvalidInput):
                    await _abort(context, task)
                yield await task
        finally:
            reader.cancel()  # in-flight steps finish on their own: their sessions stay usable

    async def _read_stream(self, requests: AsyncIterator[Any], replies: asyncio.Queue) -> None:
        """Start one task per request; chain the tasks of one sequence so they keep their order.
        The ``None`` after the last one tells the writer to finish, a malformed message's error
        to fail the stream; when the writer is gone (it cancels this reader) nobody waits for
        it, and a full queue would block it forever."""
        last_of_sequence: dict[str, asyncio.Task] = {}
        end: InvalidInput | None = None
        try:
            async for request in requests:
                key = _sequence_key(request)
                before = last_of_sequence.get(key) if key else None
                task = asyncio.create_task(self._stream_reply(request, before))
                if key:
                    last_of_sequence[key] = task
                    task.add_done_callback(lambda t, k=key: _forget(last_of_sequence, k, t))
                await replies.put(task)
        except InvalidInput as e:  # bytes that do not parse (serving.rpc_guard)
            end = e
        except Exception as e:  # the client went away mid-stream; answer what was asked
            log.debug("ModelStreamInfer: request stream ended: %r", e)
        await replies.put(end)  # not reached when cancelled

    async def _stream_reply(self, request: Any, before: asyncio.Task | None) -> Any:
        if before is not None:
            await asyncio.wait([before])  # the previous step of this sequence comes first
        try:
            return pb.ModelStreamInferResponse(infer_response=await self.infer(request))
        except Exception as e:
            code, message = _status(e)
            return pb.ModelStreamInferResponse(
                error_message=f"[{code.name}] {message}",
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name,
                    model_version=request.model_version,
                    id=request.id,
                ),
            )

    async def infer(self, request: Any) -> Any:
        """One ModelInferRequest → ModelInferResponse; raises RnnServeError for the client.
        Counted in the model's statistics, as a success or a failure."""
        clock = RequestClock()
        try:
            response = await self._timed_infer(request, clock)
        except BaseException:
            self.statistics.failed(clock)
            raise
        self.statistics.succeeded(clock)
        return response

    async def _timed_infer(self, request: Any, clock: RequestClock) -> Any:
        control = sequence_control(request)
        if control.sequence_id is None:
            model = self.engine.model(request.model_name, parse_version(request.model_version))
        else:
            model = self._sequence_model(request, control)
        m = model.manifest
        clock.resolved(m.name, m.version)
        wanted = requested_outputs(request, m)
        rows = decode_rows(m, request, self.engine.input_limit(m))  # checked once, here
        check_reply_size(request, m, rows, wanted, self.max_reply_bytes)
        clock.inputs_decoded(len(rows))
        timing = step_timing.set(clock)  # the scheduler reports this request's queue and batch
        try:
            if control.sequence_id is None:
                y = await self._stateless(model, rows)
            else:
                y = await self._sequence_step(model, control, rows)
        finally:
            step_timing.reset(timing)
        clock.engine_answered()
        return infer_response(request, m, y, wanted)

    async def _stateless(self, model: LoadedModel, rows: list[np.ndarray]) -> np.ndarray:
        m = model.manifest
        if not m.streamable:
            return await self.engine.predict(m.name, m.version, rows)  # (B, O)
        # in waves of at most MAX_PADDED_STEPS rows × steps: the rows run as one step batch,
        # whose memory grows with rows × T (as a Predict call's, see serving.predict_batcher)
        wave = max(1, MAX_PADDED_STEPS // len(rows[0]))
        ys = []
        for start in range(0, len(rows), wave):
            chunk = rows[start : start + wave]
            ys += await asyncio.gather(*(self._fresh_steps(m, row) for row in chunk))
        return np.stack(ys)  # (B, T, O)

    async def _fresh_steps(self, m: Manifest, row: np.ndarray) -> np.ndarray:
        """One row from the initial state, through a throwaway session (batched like any step)."""
        info = self.engine.open_session(m.name, m.version)
        try:
            sess, rt = self.engine.lookup(info.session_id)
            return (await self.engine.step_checked(sess, rt, row)).y  # (T, O)
        finally:
            self.engine.close_session(info.session_id)

    def _sequence_model(self, request: Any, control: SequenceControl) -> LoadedModel:
        """The model a sequence step runs on: the request's, or the open sequence's version."""
        version = parse_version(request.model_version)
        model = self.engine.model(request.model_name, version)
        if not model.manifest.streamable:
            raise NotStreamable(
                f"{model.manifest.name} reads whole sequences (bidirectional), so it has no "
                "stateful sequences: send the request without sequence_id for a stateless "
                "inference of the whole sequence"
            )
        if control.start:
            return model
        info = self._open_sequence(request.model_name, control.sequence_id)
        if version is not None and version != info.version:
            raise InvalidInput(
                f"sequence {control.sequence_id!r} runs on {info.model} version {info.version}, "
                f"not {version}",
                field="version",
            )
        return self.engine.model(info.model, info.version)

    def _open_sequence(self, model: str, sequence_id: int | str) -> Any:
        """The session of an open sequence, with OIP words for 'never started' and 'expired'."""
        try:
            return self.engine.session(session_id_for(model, sequence_id))
        except SessionExpired as e:
            raise SessionExpired(
                f"sequence {sequence_id!r} of model {model!r} idled past the session TTL and "
                "expired; start it again with sequence_start=true"
            ) from e
        except SessionNotFound as e:
            raise SessionNotFound(
                f"sequence {sequence_id!r} of model {model!r} is not open (never started, or "
                "already ended): its first request must carry sequence_start=true"
            ) from e

    async def _sequence_step(
        self, model: LoadedModel, control: SequenceControl, rows: list[np.ndarray]
    ) -> np.ndarray:
        m = model.manifest
        if len(rows) != 1:
            raise InvalidInput(
                f"a sequence request carries one row (batch 1), got {len(rows)}: send "
                f"{expected_inputs(m)}",
                field="inputs",
            )
        sid = session_id_for(m.name, control.sequence_id)
        if control.start:
            self._start(m, sid)
        try:
            sess, rt = self.engine.lookup(sid)  # rows were decoded against rt.manifest
            result = await self.engine.step_checked(sess, rt, rows[0])
        except BaseException:
            if control.start:  # all or nothing: a failed first step leaves no sequence behind
                _close_quietly(self.engine, sid)
            raise
        if control.end:  # ends exactly this sequence, after its last step
            _close_quietly(self.engine, sid)
        return result.y[None]  # (1, T, O)

    def _start(self, m: Manifest, sid: str) -> None:
        """Open with fresh state; a start on an open sequence restarts it (as Triton does)."""
        _close_quietly(self.engine, sid)
        self.engine.open_session(m.name, m.version, session_id=sid)


def _sequence_key(request: Any) -> str | None:
    """The session id: 7 and "7" name one sequence, so they must share one chain too."""
    try:
        seq = sequence_control(request).sequence_id
    except InvalidInput:
        return None  # answered with an error by infer(); needs no ordering
    return session_id_for(request.model_name, seq) if seq is not None else None


def _forget(chains: dict, key: Any, task: asyncio.Task) -> None:
    if chains.get(key) is task:
        del chains[key]


def _close_quietly(engine: Any, session_id: str) -> None:
    with contextlib.suppress(SessionNotFound, SessionExpired):
        engine.close_session(session_id)


def _status(e: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, RnnServeError):
        return grpc_status(e), str(e)
    log.exception("OIP: unexpected error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"


async def _abort(context: Any, e: BaseException) -> None:
    code, message = _status(e)
    await context.abort(code, _clipped(message))


def _clipped(message: str) -> str:
    """Messages echo client values (a model name, a sequence id); past gRPC's metadata limit the
    client would get "Stream removed" instead of the status."""
    return message if len(message) <= MAX_ERROR_MESSAGE else message[: MAX_ERROR_MESSAGE - 1] + "…"


def _server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rnnserve")
    except PackageNotFoundError:
        return "0.0.0"


# ---- registration --------------------------------------------------------------------------

_UNARY = {
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse"),
    "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
}


def add_to_server(server: grpc.aio.Server, engine: Any) -> GRPCInferenceService:
    """Serve ``inference.GRPCInferenceService`` for ``engine`` on a grpc.aio server."""
    servicer = GRPCInferenceService(engine)
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=getattr(pb, req).FromString,
            response_serializer=getattr(pb, resp).SerializeToString,
        )
        for name, (req, resp) in _UNARY.items()
    }
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=pb.ModelStreamInferResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return servicer
