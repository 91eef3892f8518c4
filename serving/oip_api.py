"""The Open Inference Protocol's (KServe v2 gRPC) Python half: the RPCs the native core bridges
here (server and model health, metadata, Triton's model configuration and repository index).

ModelInfer, ModelStreamInfer (with Triton's sequence extension) and ModelStatistics are served
by the core itself (``serving/core/src/oip_service.cc``), but for stateless requests to a model
that reads whole sequences (bidirectional), which it hands to ``ModelInfer`` here, checked the same
way. docs/oip.md describes the wire contract.

Why a private descriptor pool: ``tritonclient`` registers the same full names
(``inference.ModelInferRequest``, ...) from its own ``grpc_service.proto`` in protobuf's default
pool, and two files defining one symbol cannot share a pool. Importing our generated
``grpc_service_pb2`` next to tritonclient (tests, a gateway embedding both) would fail with
"duplicate symbol", so this module builds its message classes from the generated file's
serialized descriptor in a pool of its own and never imports that module.
"""

from __future__ import annotations

import ast
import logging
import math
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving import codec
from serving.backends import LoadedModel, OnnxBackend, TorchScriptBackend
from serving.core.model_control import ModelControl, VersionStatus
from serving.engine import MAX_PREDICT_ROWS
from serving.errors import InvalidInput, PayloadTooLarge, RnnServeError, Unavailable, grpc_status
from serving.manifest import Manifest

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
SERVER_NAME = "rnnserve"
EXTENSIONS = ("sequence", "classification", "model_configuration", "statistics", "model_repository")
INPUT_ALIAS = "INPUT"  # Triton examples' customary name; accepted besides the manifest's name
TEXT_INPUT = "text"  # BYTES, one UTF-8 string: char models only
OUTPUT_Y = "y"  # FP32 raw head output
OUTPUT_PROBS = "probabilities"  # FP32, classifiers and char models
OUTPUT_LABEL = "label"  # BYTES, the most likely label / next character
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


# ---- requests and replies --------------------------------------------------------------


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


# ---- Triton's model configuration and repository index -----------------------------------

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


def repository_index(rows: Iterable[VersionStatus], ready_only: bool) -> Any:
    """Every version loaded or in the store, READY or UNAVAILABLE with the reason."""
    response = pb.RepositoryIndexResponse()
    for r in rows:
        if r.state == "READY" or not ready_only:
            response.models.add(name=r.name, version=str(r.version), state=r.state, reason=r.reason)
    return response


def control_version(parameters: Any, loading: bool) -> int | None:
    """The version a model-control request names in its "version" parameter (None: every
    version). rnnserve loads from its store only, so a load's config or file override is refused;
    other parameters (tritonclient's "unload_dependents") are ignored."""
    for key in parameters:
        if loading and (key == "config" or key.startswith("file:")):
            raise InvalidInput(
                f"parameter {key!r} is not supported: rnnserve loads model versions from its "
                "store only; copy the version folder into the store and load the model by name",
                key,
            )
    if "version" not in parameters:
        return None
    p = parameters["version"]
    kind = p.WhichOneof("parameter_choice")
    if kind == "int64_param" and p.int64_param >= 1:
        return int(p.int64_param)
    text = p.string_param if kind == "string_param" else ""
    if text.isascii() and text.isdigit() and len(text) <= 18 and int(text) >= 1:
        return int(text)
    got = repr(getattr(p, kind))[:64] if kind else "nothing"
    raise InvalidInput(
        f"parameter 'version' must be a positive integer (int64_param, or string_param of "
        f"digits), got {got}",
        "version",
    )


# ---- the servicer --------------------------------------------------------------------------


class GRPCInferenceService:
    """The bridged methods of ``inference.GRPCInferenceService``: ``handler(request, context)``."""

    def __init__(self, engine: Any, control: ModelControl | None = None) -> None:
        self.engine = engine
        self.control = control  # model control (load / unload while serving)
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
            self.engine.ready_model(request.name, parse_version(request.version))
        except InvalidInput as e:
            await _abort(context, e)
        except RnnServeError:  # unknown, unloading or unloaded: not ready (as Triton answers)
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

    # -- Triton's extensions: configuration, repository index --
    async def ModelConfig(self, request: Any, context: Any) -> Any:
        try:
            model = self.engine.model(request.name, parse_version(request.version))
            return pb.ModelConfigResponse(config=model_config(model, self.engine.config))
        except Exception as e:
            await _abort(context, e)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        if self.control is None:
            rows = [
                VersionStatus(lm.manifest.name, lm.manifest.version, "READY", "")
                for lm in sorted(self.engine.models(), key=lambda lm: lm.key)
            ]
        else:
            rows = self.control.index()
        return repository_index(rows, request.ready)

    # -- Triton's model control: versions loaded and unloaded while serving --
    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        try:
            version = control_version(request.parameters, loading=True)
            await self._control(request.model_name).load(request.model_name, version)
            return pb.RepositoryModelLoadResponse()
        except Exception as e:
            await _abort(context, e)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        try:
            version = control_version(request.parameters, loading=False)
            await self._control(request.model_name).unload(request.model_name, version)
            return pb.RepositoryModelUnloadResponse()
        except Exception as e:
            await _abort(context, e)

    def _control(self, model_name: str) -> ModelControl:
        if not model_name:
            raise InvalidInput("model_name is empty: name the model to (un)load", "model_name")
        if self.control is None:
            raise Unavailable("model control is not available on this server")
        return self.control

    # -- inference the core hands over --
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        """Stateless inference on a model that reads whole sequences (bidirectional): the core
        steps every other request itself and sends only these here, sequence parameters checked."""
        try:
            model = self.engine.model(request.model_name, parse_version(request.model_version))
            m = model.manifest
            wanted = requested_outputs(request, m)
            rows = decode_rows(m, request, self.engine.input_limit(m))
            check_reply_size(request, m, rows, wanted, self.max_reply_bytes)
            y = await self.engine.predict(m.name, m.version, rows)  # (B, O)
            return infer_response(request, m, y, wanted)
        except Exception as e:
            await _abort(context, e)


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


# ---- the bridge's routes ------------------------------------------------------------------

BRIDGED = {  # method → (request, reply) message names
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
    "RepositoryModelLoad": ("RepositoryModelLoadRequest", "RepositoryModelLoadResponse"),
    "RepositoryModelUnload": ("RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse"),
}
