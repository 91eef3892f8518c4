"""Fuzzing every RPC of both services and the TorchServe body parser (issue 13), in bounded time.

Hypothesis (derandomized: the same examples every run, no example database) mutates valid
requests: bytes flipped, cut, inserted or replaced, fields set to odd values (0, -1, 2**63 - 1,
NaN, "²", 10,000 characters, ...), or plain random bytes, one to three messages per stream. Every
call must end within 5 s with a status other than INTERNAL or UNKNOWN, and a neighbour session
stepped before and after the fuzzing must still equal the eager reference.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from eager import Reference
from grpc_support import manifest, raw, server_config, to_input
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from serving import oip_api
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.errors import RnnServeError
from serving.server import ServerThread
from serving.torchserve.handler import parse_request, read_body

OIP = oip_api.pb
OIP_SERVICE = oip_api.DESCRIPTOR_POOL.FindServiceByName("inference.GRPCInferenceService")
OUR_SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
CALL_TIMEOUT_S = 5.0
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    deadline=None,  # the 5 s bound is asserted per call instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INTS = [0, 1, -1, 7, 1024, 1025, 4097, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
FLOATS = [0.0, -0.0, 1.0, -1.0, 1e38, -1e38, math.nan, math.inf, -math.inf, 5e-324]
TEXTS = ["", "1", "²", "sine", "char", "seq_lstm", "x" * 10_000, "\x00", "oip:sine:7", "ünï"]
MAP_KEYS = ["sequence_id", "sequence_start", "sequence_end", "classification", "x"]


@dataclass(frozen=True)
class Method:
    path: str
    client_streaming: bool
    server_streaming: bool
    seeds: tuple  # valid request messages to mutate


# ---- the server, a fuzz session per model kind, and the neighbour ------------------------------


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    with ServerThread(server_config(quick_store)) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def our_seeds(stub: pb_grpc.RnnServeStub) -> dict[str, list]:
    """Valid requests of every rnnserve.v1 RPC, on sessions opened for the fuzzing."""
    sine = stub.OpenSession(pb.OpenSessionRequest(model="sine")).session_id
    char = stub.OpenSession(pb.OpenSessionRequest(model="char")).session_id
    x = to_input(np.array([[0.5], [-0.25]], np.float32))
    step = pb.StepRequest(session_id=sine, input=x)
    text_step = pb.StepRequest(session_id=char, input=pb.Input(text="ab"), top_k=3)
    packed = pb.PackedSteps(
        model="sine", session_ids=[sine], steps=2, features=np.ones(2, "<f4").tobytes()
    )
    exported = stub.OpenSession(pb.OpenSessionRequest(model="sine")).session_id
    blob = stub.ExportSession(pb.ExportSessionRequest(session_id=sine)).blob
    return {
        "ListModels": [pb.ListModelsRequest()],
        "GetModel": [pb.GetModelRequest(name="seq_lstm", version=1)],
        "OpenSession": [pb.OpenSessionRequest(model="sine")],
        "CloseSession": [pb.CloseSessionRequest(session_id="never-opened")],
        "ResetSession": [pb.ResetSessionRequest(session_id=char)],
        "Step": [step, text_step],
        "Session": [step, pb.StepRequest(input=x)],
        "Generate": [pb.GenerateRequest(session_id=char, prompt=pb.Input(text="a"), max_tokens=3)],
        "StepMany": [
            pb.StepManyRequest(steps=[step, text_step]),
            pb.StepManyRequest(packed=packed),
        ],
        "ExportSession": [pb.ExportSessionRequest(session_id=exported)],
        "ImportSession": [
            pb.ImportSessionRequest(blob=blob),
            pb.ImportSessionRequest(blob=blob[:9], session_id="chosen", model="sine", version=1),
        ],
        "Predict": [
            pb.PredictRequest(model="seq_bilstm", inputs=[to_input(np.ones((3, 10), np.float32))]),
            pb.PredictRequest(model="char", inputs=[pb.Input(text="hello")]),
        ],
    }


def oip_infer(model: str, datatype: str, shape: list[int], data: bytes, **params) -> object:
    request = OIP.ModelInferRequest(model_name=model, id="fuzz")
    request.inputs.add(name="INPUT", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    for key, value in params.items():
        field = "int64_param" if isinstance(value, int) and not isinstance(value, bool) else None
        setattr(request.parameters[key], field or "bool_param", value)
    return request


def oip_seeds() -> dict[str, list]:
    infers = [
        oip_infer("sine", "FP32", [1, 2, 1], np.ones(2, "<f4").tobytes()),
        oip_infer("sine", "FP32", [1, 1, 1], b"\0\0\0?", sequence_id=4242, sequence_start=True),
        oip_infer("char", "INT64", [1, 3], np.arange(3, dtype="<i8").tobytes()),
        oip_infer("seq_bilstm", "FP32", [1, 2, 10], np.ones(20, "<f4").tobytes()),
    ]
    text = OIP.ModelInferRequest(model_name="char")
    text.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")
    classify = OIP.ModelInferRequest(model_name="seq_lstm")
    classify.inputs.add(name="x", datatype="FP32", shape=[1, 1, 10]).contents.fp32_contents.extend(
        [0.5] * 10
    )
    classify.outputs.add(name="probabilities").parameters["classification"].int64_param = 2
    infers += [text, classify]
    named = {"name": "sine", "version": "1"}
    return {
        "ServerLive": [OIP.ServerLiveRequest()],
        "ServerReady": [OIP.ServerReadyRequest()],
        "ServerMetadata": [OIP.ServerMetadataRequest()],
        "ModelReady": [OIP.ModelReadyRequest(**named)],
        "ModelMetadata": [OIP.ModelMetadataRequest(**named)],
        "ModelConfig": [OIP.ModelConfigRequest(**named)],
        "ModelStatistics": [OIP.ModelStatisticsRequest(**named)],
        "RepositoryIndex": [OIP.RepositoryIndexRequest()],
        # a load of what is loaded changes nothing; an unload only of a model nobody uses (the
        # store is the shared quick store, and its models serve the neighbour)
        "RepositoryModelLoad": [OIP.RepositoryModelLoadRequest(model_name="sine")],
        "RepositoryModelUnload": [OIP.RepositoryModelUnloadRequest(model_name="no_such_model")],
        "ModelInfer": infers,
        "ModelStreamInfer": infers,
    }


def every_method(stub: pb_grpc.RnnServeStub) -> list[Method]:
    seeds = {OUR_SERVICE.full_name: our_seeds(stub), OIP_SERVICE.full_name: oip_seeds()}
    methods = []
    for service in (OUR_SERVICE, OIP_SERVICE):
        for m in service.methods:
            methods.append(
                Method(
                    f"/{service.full_name}/{m.name}",
                    m.client_streaming,
                    m.server_streaming,
                    tuple(seeds[service.full_name][m.name]),  # KeyError: a new RPC needs seeds
                )
            )
    return methods


# ---- mutations ---------------------------------------------------------------------------------


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "replace", "repeat"]))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif op == "replace":
            data[at : at + 4] = draw(st.binary(min_size=4, max_size=4))
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 32))] * draw(st.integers(2, 64))
    return bytes(data)


def odd_value(draw, field) -> object:
    """A value for a scalar field of this type, drawn from the odd ones."""
    fd = field
    if fd.type == fd.TYPE_BOOL:
        return draw(st.booleans())
    if fd.type in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return draw(st.sampled_from(FLOATS))
    if fd.type == fd.TYPE_STRING:
        return draw(st.sampled_from(TEXTS))
    if fd.type == fd.TYPE_BYTES:
        return draw(st.binary(max_size=64))
    if fd.type == fd.TYPE_ENUM:
        return draw(st.sampled_from([v.number for v in list(fd.enum_type.values)]))
    unsigned = fd.type in (fd.TYPE_UINT32, fd.TYPE_UINT64, fd.TYPE_FIXED32, fd.TYPE_FIXED64)
    bits = 32 if fd.type in (fd.TYPE_INT32, fd.TYPE_UINT32, fd.TYPE_SINT32, fd.TYPE_FIXED32,
                             fd.TYPE_SFIXED32) else 64  # fmt: skip
    lo, hi = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return min(hi, max(lo, draw(st.sampled_from(INTS))))


def mutate_field(draw, message, depth: int = 0) -> None:
    """Set one field somewhere in ``message`` (walking into submessages) to an odd value."""
    fields = message.DESCRIPTOR.fields
    if not fields:
        return
    fd = draw(st.sampled_from(list(fields)))
    value = getattr(message, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key_field = fd.message_type.fields_by_name["key"]
        key = draw(st.sampled_from(MAP_KEYS)) if key_field.type == key_field.TYPE_STRING else 0
        if fd.message_type.fields_by_name["value"].message_type is not None:
            mutate_field(draw, value[key], depth + 1)
        return
    if fd.message_type is not None:
        if fd.is_repeated:
            target = value[draw(st.integers(0, len(value) - 1))] if value else value.add()
        else:
            target = value
        if depth < 4:
            mutate_field(draw, target, depth + 1)
        return
    new = odd_value(draw, fd)
    if not fd.is_repeated:
        setattr(message, fd.name, new)
    elif draw(st.booleans()):
        del value[:]
    else:
        value.extend([new] * draw(st.sampled_from([1, 3, 1000])))


@st.composite
def fuzzed_message(draw, seeds: tuple) -> bytes:
    seed = draw(st.sampled_from(seeds))
    how = draw(st.sampled_from(["bytes", "field", "field", "random"]))
    if how == "random":
        return draw(st.binary(max_size=96))
    if how == "bytes":
        return draw(mutated_bytes(seed.SerializeToString()))
    message = type(seed)()
    message.CopyFrom(seed)
    for _ in range(draw(st.integers(1, 3))):
        mutate_field(draw, message)
    return message.SerializeToString()


# ---- calls -------------------------------------------------------------------------------------


def call(channel: grpc.Channel, method: Method, messages: list[bytes]) -> grpc.StatusCode:
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    rpc = kind(method.path)  # raw bytes both ways
    request = iter(messages) if method.client_streaming else messages[0]
    try:
        replies = rpc(request, timeout=CALL_TIMEOUT_S)
        if method.server_streaming:
            list(replies)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def reload_every_model(channel: grpc.Channel) -> None:
    """Load back what the fuzzing unloaded: a fuzzed RepositoryModelUnload may name a real model
    ("char" is one of the odd texts), and this module's later tests open sessions on them."""
    control = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    def not_ready() -> dict[str, str]:
        index = control.RepositoryIndex(
            service_pb2.RepositoryIndexRequest(), timeout=CALL_TIMEOUT_S
        )
        return {m.name: m.state for m in index.models if m.state != "READY"}

    unloaded = sorted(not_ready())
    print("loading back what the fuzzing unloaded:", unloaded or "nothing")
    for name in unloaded:
        load = service_pb2.RepositoryModelLoadRequest(model_name=name)
        control.RepositoryModelLoad(load, timeout=CALL_TIMEOUT_S)
    assert not_ready() == {}


def test_fuzzing_every_rpc_never_fails_inside_and_leaves_a_neighbour_exact(channel, quick_store):
    stub = pb_grpc.RnnServeStub(channel)
    m = manifest(quick_store, "seq_lstm")
    rng = np.random.default_rng(11)
    chunks = [rng.normal(size=(3, m.input.features)).astype(np.float32) for _ in range(2)]
    neighbour = stub.OpenSession(pb.OpenSessionRequest(model=m.name)).session_id
    first = raw(stub.Step(pb.StepRequest(session_id=neighbour, input=to_input(chunks[0]))))
    methods = every_method(stub)
    seen: dict[str, set] = {}

    @settings(FUZZ, max_examples=2500)
    @given(st.data())
    def fuzz(data) -> None:
        method = data.draw(st.sampled_from(methods))
        count = data.draw(st.integers(1, 3)) if method.client_streaming else 1
        messages = [data.draw(fuzzed_message(method.seeds)) for _ in range(count)]
        started = time.monotonic()
        code = call(channel, method, messages)
        elapsed = time.monotonic() - started
        seen.setdefault(method.path, set()).add(code.name)
        assert code not in BAD_CODES, (method.path, code, messages)
        assert elapsed < CALL_TIMEOUT_S, (method.path, elapsed)

    started = time.monotonic()
    try:
        fuzz()
    finally:
        reload_every_model(channel)
    codes = {path: sorted(c) for path, c in seen.items()}
    print(f"fuzzed for {time.monotonic() - started:.1f} s:", codes)
    assert len(seen) == len(methods)  # every RPC was called
    second = raw(stub.Step(pb.StepRequest(session_id=neighbour, input=to_input(chunks[1]))))
    want = Reference(quick_store).run(m.name, chunks)
    np.testing.assert_allclose(np.concatenate([first, second]), want, atol=1e-5)


def test_a_blob_changed_in_any_way_is_refused_as_invalid_argument(channel):
    stub = pb_grpc.RnnServeStub(channel)
    sid = stub.OpenSession(pb.OpenSessionRequest(model="char")).session_id
    stub.Step(pb.StepRequest(session_id=sid, input=pb.Input(text="ab")))
    blob = stub.ExportSession(pb.ExportSessionRequest(session_id=sid)).blob

    @settings(FUZZ, max_examples=300)
    @given(mutated_bytes(blob))
    def fuzz(changed: bytes) -> None:
        try:
            stub.ImportSession(pb.ImportSessionRequest(blob=changed), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
            assert e.details().startswith("the session blob "), e.details()
            return
        assert changed == blob  # only the unchanged blob imports

    fuzz()


# ---- the TorchServe body parser, in-process ----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(INTS + FLOATS) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=40,
)
fields = st.sampled_from(["inputs", "text", "tokens", "generate", "horizon", "top_k", "x"])
bodies = st.one_of(
    st.dictionaries(fields, json_values, max_size=4),  # already decoded, as TorchServe passes it
    st.dictionaries(fields, json_values, max_size=4).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=200),
    st.text(max_size=200),
    st.just("[" * 5000 + "]" * 5000),
)


@pytest.mark.parametrize("name", ["sine", "char", "seq_lstm", "seq_bilstm"])
def test_fuzzing_the_torchserve_body_parser_raises_only_client_errors(quick_store, name):
    m = manifest(quick_store, name)

    @settings(FUZZ, max_examples=150)
    @given(bodies, st.sampled_from(["body", "data"]))
    def fuzz(body, key) -> None:
        started = time.monotonic()
        try:
            parse_request(m, read_body({key: body}, 1 << 20))
        except RnnServeError as e:  # a client error: the handler answers it with a 4xx
            assert len(str(e)) <= 2048, str(e)[:200]
        assert time.monotonic() - started < CALL_TIMEOUT_S

    fuzz()
