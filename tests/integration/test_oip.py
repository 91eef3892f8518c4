"""The Open Inference Protocol, driven by the unmodified ``tritonclient`` package.

A real server (``create_server`` on 127.0.0.1, every model of ``quick_store``) in a background
thread; ``tritonclient.grpc.InferenceServerClient`` drives stateful sequences with Triton's
sequence parameters, unary and streaming. Every output is checked against the eager PyTorch
reference (``training.reference``) run offline on the same inputs, and against our own API.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.client import Client
from serving.engine import EngineConfig
from serving.manifest import Manifest, list_versions, load_manifest
from serving.server import ServerConfig, ServerThread
from training.reference import load_eager

TOL = 1e-5
STREAMABLE = ["sum_sign_lstm", "seq_gru", "elman", "sine", "char_hello"]


# ---- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    config = ServerConfig(
        EngineConfig(store=quick_store), address="127.0.0.1:0", metrics_port=None, grace_s=2.0
    )
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.address)
    yield c
    c.close()


def manifest(store: Path, name: str) -> Manifest:
    return load_manifest(store / name / str(list_versions(store, name)[-1]), verify=False)


def random_chunks(m: Manifest, lengths: list[int], seed: int) -> list[np.ndarray]:
    """Inputs for len(lengths) requests of that many time steps: (T, F) float32 or (T,) int64."""
    rng = np.random.default_rng(seed)
    if m.input.kind == "features":
        return [rng.standard_normal((t, m.input.features)).astype(np.float32) for t in lengths]
    return [rng.integers(0, len(m.input.vocab), t).astype(np.int64) for t in lengths]


def infer_input(m: Manifest, chunk: np.ndarray) -> triton.InferInput:
    """One sequence row as the batch-1 tensor OIP carries: [1, T, F] FP32 or [1, T] INT64."""
    batch = chunk[None]
    datatype = "FP32" if m.input.kind == "features" else "INT64"
    tensor = triton.InferInput(m.input.name, list(batch.shape), datatype)
    tensor.set_data_from_numpy(batch)
    return tensor


@functools.cache
def eager(version_dir: Path) -> torch.nn.Module:
    return load_eager(version_dir)


def eager_steps(store: Path, m: Manifest, chunks: list[np.ndarray]) -> np.ndarray:
    """The offline reference: the eager model stepped chunk by chunk from its initial state."""
    model = eager(store / m.name / str(m.version))
    states = model.init_states(1)
    ys = []
    with torch.no_grad():
        for chunk in chunks:
            y, *states = model.step(torch.from_numpy(chunk)[None], *states)
            ys.append(y[0].numpy())
    return np.concatenate(ys)  # (sum T, O)


def eager_sequence(store: Path, m: Manifest, batch: np.ndarray) -> np.ndarray:
    model = eager(store / m.name / str(m.version))
    lengths = torch.full((batch.shape[0],), batch.shape[1], dtype=torch.int64)
    with torch.no_grad():
        return model.sequence(torch.from_numpy(batch), lengths).numpy()  # (B, O)


def our_api_steps(address: str, m: Manifest, chunks: list[np.ndarray]) -> np.ndarray:
    with Client(address) as c, c.session(m.name) as s:
        replies = [
            s.step(ch) if m.input.kind == "features" else s.step(tokens=ch.tolist())
            for ch in chunks
        ]
    return np.array([o.raw for r in replies for o in r.outputs], dtype=np.float32)


def unary_sequence(client, m: Manifest, seq_id, chunks: list[np.ndarray]) -> np.ndarray:
    ys = []
    for i, chunk in enumerate(chunks):
        result = client.infer(
            m.name,
            [infer_input(m, chunk)],
            sequence_id=seq_id,
            sequence_start=i == 0,
            sequence_end=i == len(chunks) - 1,
        )
        ys.append(result.as_numpy("y")[0])  # (T, O)
    return np.concatenate(ys)


def error_of(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


class StreamCollector:
    """tritonclient's stream callback → results by request id, waitable."""

    def __init__(self) -> None:
        self.replies: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.replies.put((result, error))

    def take(self, n: int, timeout: float = 60.0) -> dict[str, tuple]:
        out = {}
        for _ in range(n):
            result, error = self.replies.get(timeout=timeout)
            rid = result.get_response().id if result is not None else f"error{len(out)}"
            out[rid] = (result, error)
        return out


# ---- health and metadata -----------------------------------------------------------------------


def test_server_and_model_health(client, quick_store):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "rnnserve"
    assert "sequence" in meta.extensions
    assert client.is_model_ready("seq_lstm")
    assert client.is_model_ready("seq_bilstm")
    assert not client.is_model_ready("no_such_model")
    assert not client.is_model_ready("seq_lstm", model_version="99")
    unserved = error_of(client.get_trace_settings)  # not part of what we serve
    assert unserved.status() == "StatusCode.UNIMPLEMENTED"


@pytest.mark.parametrize("name", ["sum_sign_lstm", "seq_lstm", "seq_bilstm", "sine", "char"])
def test_model_metadata_follows_the_manifest(client, quick_store, name):
    m = manifest(quick_store, name)
    meta = client.get_model_metadata(name)
    assert meta.name == name
    assert meta.versions == [str(v) for v in list_versions(quick_store, name)]
    assert meta.platform == "onnxruntime_onnx"
    (inp,) = meta.inputs
    if m.input.kind == "features":
        assert (inp.name, inp.datatype, list(inp.shape)) == (
            "x",
            "FP32",
            [-1, -1, m.input.features],
        )
    else:
        assert (inp.name, inp.datatype, list(inp.shape)) == ("tokens", "INT64", [-1, -1])
    outputs = {o.name: (o.datatype, list(o.shape)) for o in meta.outputs}
    per_step = [-1, -1] if m.streamable else [-1]
    assert outputs["y"] == ("FP32", [*per_step, m.output.size])
    if m.output.kind == "regression":
        assert set(outputs) == {"y"}
    else:
        assert outputs["label"] == ("BYTES", per_step)
    unknown = error_of(lambda: client.get_model_metadata("no_such_model"))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in unknown.message()


# ---- stateful sequences ------------------------------------------------------------------------


@pytest.mark.parametrize("name", STREAMABLE)
def test_unary_sequence_equals_eager_reference_and_our_api(server, client, quick_store, name):
    m = manifest(quick_store, name)
    chunks = random_chunks(m, [3, 1, 5, 2], seed=1)
    got = unary_sequence(client, m, seq_id=1000 + len(name), chunks=chunks)
    np.testing.assert_allclose(got, eager_steps(quick_store, m, chunks), atol=TOL, rtol=0)
    np.testing.assert_allclose(got, our_api_steps(server.address, m, chunks), atol=TOL, rtol=0)


def test_classifier_outputs_probabilities_and_labels(client, quick_store):
    m = manifest(quick_store, "seq_lstm")
    (chunk,) = random_chunks(m, [4], seed=2)
    result = client.infer(m.name, [infer_input(m, chunk)], sequence_id="probs", sequence_start=True)
    y = result.as_numpy("y")  # (1, T, O)
    p = result.as_numpy("probabilities")
    assert m.output.activation == "softmax"  # so the probabilities are softmax(y), written out:
    z = np.exp(y.astype(np.float64) - y.max(axis=-1, keepdims=True))
    np.testing.assert_allclose(p, z / z.sum(axis=-1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(y[0], eager_steps(quick_store, m, [chunk]), atol=TOL, rtol=0)
    labels = [s.decode() for s in result.as_numpy("label")[0]]
    assert labels == [m.output.labels[i] for i in p[0].argmax(-1)]
    only_y = client.infer(
        m.name,
        [infer_input(m, chunk)],
        outputs=[triton.InferRequestedOutput("y")],
        sequence_id="probs",
        sequence_end=True,
    )
    assert only_y.as_numpy("probabilities") is None and only_y.as_numpy("y").shape == y.shape


def test_triton_classification_extension_ranks_probabilities(client, quick_store):
    m = manifest(quick_store, "char_hello")
    (chunk,) = random_chunks(m, [3], seed=3)
    full = client.infer(m.name, [infer_input(m, chunk)]).as_numpy("probabilities")  # (1, T, V)
    top = client.infer(
        m.name,
        [infer_input(m, chunk)],
        outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
    ).as_numpy("probabilities")  # (1, T, 3) of b"value:index:label"
    assert top.shape == (1, 3, 3)
    for t in range(3):
        order = np.argsort(-full[0, t], kind="stable")[:3]
        entries = [s.decode().split(":", 2) for s in top[0, t]]
        assert [int(i) for _, i, _ in entries] == order.tolist()
        assert [label for _, _, label in entries] == [m.output.vocab[i] for i in order]
        np.testing.assert_allclose([float(v) for v, _, _ in entries], full[0, t, order], atol=1e-6)


def test_interleaved_unary_sequences_keep_their_own_state(client, quick_store):
    m = manifest(quick_store, "seq_gru")
    ids = [7, "device-a", 8, "device-b"]
    chunks = {sid: random_chunks(m, [2, 3, 1], seed=10 + i) for i, sid in enumerate(ids)}
    got = {sid: [] for sid in ids}
    for step in range(3):  # round-robin: every sequence's step k before anyone's step k + 1
        for sid in ids:
            result = client.infer(
                m.name,
                [infer_input(m, chunks[sid][step])],
                sequence_id=sid,
                sequence_start=step == 0,
                sequence_end=step == 2,
            )
            got[sid].append(result.as_numpy("y")[0])
    for sid in ids:
        expected = eager_steps(quick_store, m, chunks[sid])
        np.testing.assert_allclose(np.concatenate(got[sid]), expected, atol=TOL, rtol=0)


def test_the_integer_and_the_string_spelling_name_one_sequence(client, quick_store):
    """docs/oip.md: 7 and "7" are one sequence, so a step sent with either continues it."""
    m = manifest(quick_store, "seq_gru")
    chunks = random_chunks(m, [2, 3, 1], seed=31)
    spellings = [7007, "7007", 7007]
    got = []
    for step, sid in enumerate(spellings):
        result = client.infer(
            m.name,
            [infer_input(m, chunks[step])],
            sequence_id=sid,
            sequence_start=step == 0,
            sequence_end=step == 2,
        )
        got.append(result.as_numpy("y")[0])
    expected = eager_steps(quick_store, m, chunks)
    np.testing.assert_allclose(np.concatenate(got), expected, atol=TOL, rtol=0)


def test_stream_sequences_interleaved_equal_eager_reference(client, quick_store):
    models = {n: manifest(quick_store, n) for n in ["sum_sign_lstm", "sine", "char_hello"]}
    plan = {
        (n, k): random_chunks(m, [2, 1, 3], seed=20 + k) for n, m in models.items() for k in (1, 2)
    }
    collector = StreamCollector()
    client.start_stream(callback=collector)
    try:
        for step in range(3):
            for (name, k), chunks in plan.items():
                client.async_stream_infer(
                    name,
                    [infer_input(models[name], chunks[step])],
                    request_id=f"{name}/{k}/{step}",
                    sequence_id=k,  # the same id on different models: different sequences
                    sequence_start=step == 0,
                    sequence_end=step == 2,
                )
        replies = collector.take(3 * len(plan))
    finally:
        client.stop_stream()
    for (name, k), chunks in plan.items():
        assert all(replies[f"{name}/{k}/{s}"][1] is None for s in range(3))
        got = np.concatenate([replies[f"{name}/{k}/{s}"][0].as_numpy("y")[0] for s in range(3)])
        np.testing.assert_allclose(got, eager_steps(quick_store, models[name], chunks), atol=TOL)


def test_end_flag_ends_exactly_its_own_sequence(client, quick_store):
    m = manifest(quick_store, "elman")
    a, b = random_chunks(m, [1, 1, 1], seed=30), random_chunks(m, [1, 1, 1], seed=31)
    client.infer(m.name, [infer_input(m, a[0])], sequence_id=41, sequence_start=True)
    client.infer(m.name, [infer_input(m, b[0])], sequence_id=42, sequence_start=True)
    client.infer(m.name, [infer_input(m, a[1])], sequence_id=41, sequence_end=True)
    ended = error_of(lambda: client.infer(m.name, [infer_input(m, a[2])], sequence_id=41))
    assert ended.status() == "StatusCode.NOT_FOUND"
    assert "sequence_start" in ended.message()
    got = [
        client.infer(m.name, [infer_input(m, b[i])], sequence_id=42, sequence_end=i == 2).as_numpy(
            "y"
        )[0]
        for i in (1, 2)
    ]
    np.testing.assert_allclose(
        np.concatenate(got), eager_steps(quick_store, m, b)[1:], atol=TOL, rtol=0
    )


def test_our_api_cannot_reach_an_oip_sequence_by_its_guessable_id(server, client, quick_store):
    """OIP sequence ids are client-chosen; rnnserve.v1 only addresses ids the server issued."""
    from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
    from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

    m = manifest(quick_store, "elman")
    chunks = random_chunks(m, [2, 1, 1], seed=33)
    client.infer(m.name, [infer_input(m, chunks[0])], sequence_id=77, sequence_start=True)
    guessed = f"oip:{m.name}:77"
    step = pb.StepRequest(
        session_id=guessed, input=pb.Input(features=pb.Features(values=[0.5], steps=1))
    )
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        attempts = {
            "Step": lambda: stub.Step(step),
            "ResetSession": lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=guessed)),
            "CloseSession": lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=guessed)),
            "Generate": lambda: list(
                stub.Generate(pb.GenerateRequest(session_id=guessed, max_tokens=2))
            ),
        }
        for rpc, call in attempts.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, rpc
        many = next(stub.StepMany(iter([pb.StepManyRequest(steps=[step])])))
        assert many.results[0].error.reason == "SESSION_NOT_FOUND"
    # none of that touched the sequence: it goes on exactly as the eager run says
    got = [
        client.infer(m.name, [infer_input(m, c)], sequence_id=77, sequence_end=i == 2).as_numpy(
            "y"
        )[0]
        for i, c in enumerate(chunks[1:], start=1)
    ]
    np.testing.assert_allclose(
        np.concatenate(got), eager_steps(quick_store, m, chunks)[2:], atol=TOL, rtol=0
    )


def test_start_on_an_open_sequence_restarts_it(client, quick_store):
    m = manifest(quick_store, "sine")
    chunks = random_chunks(m, [4, 2], seed=40)
    client.infer(m.name, [infer_input(m, chunks[0])], sequence_id=50, sequence_start=True)
    again = client.infer(
        m.name, [infer_input(m, chunks[1])], sequence_id=50, sequence_start=True, sequence_end=True
    )
    fresh = eager_steps(quick_store, m, [chunks[1]])
    np.testing.assert_allclose(again.as_numpy("y")[0], fresh, atol=TOL, rtol=0)


# ---- stateless ---------------------------------------------------------------------------------


def test_stateless_request_on_a_streamable_model_runs_from_fresh_state(client, quick_store):
    m = manifest(quick_store, "seq_lstm")
    rows = np.stack(random_chunks(m, [6, 6, 6], seed=50))  # (B, T, F)
    tensor = triton.InferInput("x", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows)
    y = client.infer(m.name, [tensor]).as_numpy("y")  # (B, T, O)
    assert y.shape == (3, 6, m.output.size)
    for b in range(3):
        np.testing.assert_allclose(y[b], eager_steps(quick_store, m, [rows[b]]), atol=TOL, rtol=0)


def test_bidirectional_model_is_stateless_only(client, quick_store):
    m = manifest(quick_store, "seq_bilstm")
    rows = np.stack(random_chunks(m, [7, 7], seed=60))  # (B, T, F)
    tensor = triton.InferInput("INPUT", list(rows.shape), "FP32")  # the alias name works too
    tensor.set_data_from_numpy(rows)
    y = client.infer(m.name, [tensor]).as_numpy("y")  # (B, O)
    np.testing.assert_allclose(y, eager_sequence(quick_store, m, rows), atol=TOL, rtol=0)
    refused = error_of(lambda: client.infer(m.name, [tensor], sequence_id=9, sequence_start=True))
    assert refused.status() == "StatusCode.FAILED_PRECONDITION"
    assert "without sequence_id" in refused.message()


def test_char_model_takes_text_as_bytes(client, quick_store):
    m = manifest(quick_store, "char_hello")
    text = "hel"
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
    y = client.infer(m.name, [tensor], sequence_id="txt", sequence_start=True, sequence_end=True)
    tokens = np.array([m.input.vocab.index(c) for c in text], dtype=np.int64)
    expected = eager_steps(quick_store, m, [tokens])
    np.testing.assert_allclose(y.as_numpy("y")[0], expected, atol=TOL, rtol=0)
    labels = [s.decode() for s in y.as_numpy("label")[0]]
    assert labels == [m.output.vocab[i] for i in expected.argmax(axis=-1)]  # each step's best


@pytest.mark.parametrize("name", ["sum_sign_lstm", "char_hello"])
def test_typed_contents_equal_raw_contents(server, quick_store, name):
    """Clients that fill InferTensorContents instead of raw_input_contents get the same answer."""
    m = manifest(quick_store, name)
    (chunk,) = random_chunks(m, [5], seed=70)
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=m.name, id="typed")
        if m.input.kind == "features":
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, *chunk.shape])
            tensor.contents.fp32_contents.extend(chunk.reshape(-1).tolist())
        else:
            tensor = request.inputs.add(name="tokens", datatype="INT64", shape=[1, *chunk.shape])
            tensor.contents.int64_contents.extend(chunk.tolist())
        reply = stub.ModelInfer(request)
    assert reply.id == "typed" and reply.model_version == str(m.version)
    index = [o.name for o in reply.outputs].index("y")
    y = np.frombuffer(reply.raw_output_contents[index], dtype="<f4").reshape(
        reply.outputs[index].shape
    )
    np.testing.assert_allclose(y[0], eager_steps(quick_store, m, [chunk]), atol=TOL, rtol=0)


# ---- bad input: a clear error, the server up, no other sequence touched ------------------------


def bad_requests(m: Manifest) -> list[tuple[str, dict, str, str]]:
    """(what, infer kwargs, expected status, a phrase the message must contain)."""
    good = random_chunks(m, [2], seed=80)[0]
    f = m.input.features
    wrong_features = triton.InferInput("x", [1, 2, f + 1], "FP32")
    wrong_features.set_data_from_numpy(np.zeros((1, 2, f + 1), np.float32))
    wrong_rank = triton.InferInput("x", [2, f], "FP32")
    wrong_rank.set_data_from_numpy(np.zeros((2, f), np.float32))
    wrong_dtype = triton.InferInput("x", [1, 2, f], "FP64")
    wrong_dtype.set_data_from_numpy(np.zeros((1, 2, f), np.float64))
    nan = good.copy()
    nan[1, 0] = np.nan
    wrong_name = triton.InferInput("features", [1, 2, f], "FP32")
    wrong_name.set_data_from_numpy(good[None])
    no_such_output = triton.InferRequestedOutput("z")
    empty = triton.InferInput("x", [1, 0, f], "FP32")
    empty.set_data_from_numpy(np.zeros((1, 0, f), np.float32))
    ok = [infer_input(m, good)]
    seq = dict(sequence_id=555)
    bad, missing = "INVALID_ARGUMENT", "NOT_FOUND"
    return [
        ("unknown model", dict(model_name="nope", inputs=ok), missing, "nope"),
        ("wrong feature count", dict(inputs=[wrong_features], **seq), bad, "features"),
        ("wrong rank", dict(inputs=[wrong_rank], **seq), bad, "[1, T, "),
        ("wrong dtype", dict(inputs=[wrong_dtype], **seq), bad, "FP64"),
        ("NaN", dict(inputs=[infer_input(m, nan)], **seq), bad, "NaN"),
        ("unknown input", dict(inputs=[wrong_name], **seq), bad, "'features'"),
        ("unknown output", dict(inputs=ok, outputs=[no_such_output], **seq), bad, "'z'"),
        ("never started", dict(inputs=ok, sequence_id=556), missing, "sequence_start"),
        ("bad version", dict(inputs=ok, model_version="x"), bad, "model_version"),
        ("unknown version", dict(inputs=ok, model_version="99"), missing, "99"),
        ("empty input", dict(inputs=[empty], **seq), bad, "empty"),
        ("huge sequence id", dict(inputs=ok, sequence_id="s" * 300), bad, "at most"),
    ]


def test_bad_unary_requests_fail_clearly_and_leave_sequences_intact(client, quick_store):
    m = manifest(quick_store, "seq_lstm")
    chunks = random_chunks(m, [2, 2], seed=81)
    first = client.infer(m.name, [infer_input(m, chunks[0])], sequence_id=555, sequence_start=True)
    for what, kwargs, status, phrase in bad_requests(m):
        kwargs = {"model_name": m.name, **kwargs}
        e = error_of(lambda kw=kwargs: client.infer(**kw))
        assert e.status() == f"StatusCode.{status}", (what, e)
        assert phrase in e.message(), (what, e.message())
    last = client.infer(m.name, [infer_input(m, chunks[1])], sequence_id=555, sequence_end=True)
    got = np.concatenate([first.as_numpy("y")[0], last.as_numpy("y")[0]])
    np.testing.assert_allclose(got, eager_steps(quick_store, m, chunks), atol=TOL, rtol=0)
    assert client.is_server_live()


def test_bad_token_inputs_fail_clearly(client, quick_store):
    m = manifest(quick_store, "char_hello")
    outside = triton.InferInput("tokens", [1, 2], "INT64")
    outside.set_data_from_numpy(np.array([[0, len(m.input.vocab)]], dtype=np.int64))
    floats = triton.InferInput("tokens", [1, 2], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 2), np.float32))
    unknown_char = triton.InferInput("text", [1], "BYTES")
    unknown_char.set_data_from_numpy(np.array(["h\u00e9"], dtype=object))
    two_texts = triton.InferInput("text", [2], "BYTES")
    two_texts.set_data_from_numpy(np.array([b"he", b"ll"], dtype=object))
    for tensor, phrase in [
        (outside, "outside the vocabulary"),
        (floats, "FP32"),
        (unknown_char, "outside char_hello's vocabulary"),
        (two_texts, "one string"),
    ]:
        e = error_of(lambda t=tensor: client.infer(m.name, [t]))
        assert e.status() == "StatusCode.INVALID_ARGUMENT" and phrase in e.message(), e


def raw_request(m: Manifest, datatype: str, shape: list[int], raw: bytes) -> Any:
    """A request tritonclient would refuse to build: the shape need not match the bytes."""
    request = service_pb2.ModelInferRequest(model_name=m.name)
    request.inputs.add(name="INPUT", datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def test_malformed_wire_tensors_fail_clearly(server, quick_store):
    """Shapes whose element count overflows int64, a batch too large to run, a BYTES tensor of
    a million empty strings: INVALID_ARGUMENT with words, never INTERNAL."""
    sine, char = manifest(quick_store, "sine"), manifest(quick_store, "char_hello")
    cases = [
        (raw_request(sine, "FP32", [2**32, 2**32, 1], b""), "needs 73786976294838206464"),
        (raw_request(sine, "FP32", [2**62, 4, 1], b"\0" * 4), "needs"),
        (raw_request(sine, "FP32", [5000, 1, 1], b"\0" * 20000), "at most 4096"),
        (raw_request(char, "BYTES", [1], b"\0\0\0\0" * 1_000_000), "more than one element"),
        (raw_request(char, "BYTES", [1], b""), "no elements"),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for request, phrase in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request)
            e = caught.value
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (phrase, e.details())
            assert phrase in e.details(), e.details()


def test_bad_stream_requests_get_error_replies_and_the_stream_goes_on(client, quick_store):
    m = manifest(quick_store, "seq_lstm")
    chunks = random_chunks(m, [2, 2], seed=82)
    bad = bad_requests(m)
    collector = StreamCollector()
    client.start_stream(callback=collector)
    try:
        first = [infer_input(m, chunks[0])]
        client.async_stream_infer(
            m.name, first, request_id="1st", sequence_id=555, sequence_start=True
        )
        for i, (_, kwargs, _, _) in enumerate(bad):
            client.async_stream_infer(**{"model_name": m.name, "request_id": f"bad{i}", **kwargs})
        last = [infer_input(m, chunks[1])]
        client.async_stream_infer(
            m.name, last, request_id="last", sequence_id=555, sequence_end=True
        )
        replies = [collector.replies.get(timeout=60) for _ in range(len(bad) + 2)]
    finally:
        client.stop_stream()
    # replies come in request order: the first, one error per bad request, then the last
    errors = [e for _, e in replies[1:-1]]
    for (what, _, status, phrase), e in zip(bad, errors, strict=True):
        assert e is not None, what
        assert e.message().startswith(f"[{status}]") and phrase in e.message(), (what, e)
    assert replies[0][1] is None and replies[-1][1] is None
    got = np.concatenate([replies[0][0].as_numpy("y")[0], replies[-1][0].as_numpy("y")[0]])
    np.testing.assert_allclose(got, eager_steps(quick_store, m, chunks), atol=TOL, rtol=0)


# ---- concurrency: where Triton 2.51 crashed ----------------------------------------------------


def test_64_concurrent_stream_sequences_neither_crash_nor_mix_state(server, quick_store):
    """64 clients, each with its own stream and sequence, all stepping at once (NOTES.md: Triton
    2.51's sequence batcher segfaulted here in 11 of 21 runs)."""
    m = manifest(quick_store, "sum_sign_lstm")
    n, steps = 64, 12
    plans = [random_chunks(m, [1] * steps, seed=1000 + i) for i in range(n)]
    got: dict[int, list[np.ndarray]] = {i: [] for i in range(n)}
    failures: list[str] = []
    start = threading.Barrier(n)

    def drive(i: int) -> None:
        c = triton.InferenceServerClient(url=server.address)
        collector = StreamCollector()
        try:
            c.start_stream(callback=collector)
            start.wait(timeout=60)
            for s, chunk in enumerate(plans[i]):
                c.async_stream_infer(
                    m.name,
                    [infer_input(m, chunk)],
                    request_id=str(s),
                    sequence_id=f"dev-{i}",
                    sequence_start=s == 0,
                    sequence_end=s == steps - 1,
                )
            for _ in range(steps):
                result, error = collector.replies.get(timeout=120)
                if error is not None:
                    failures.append(f"{i}: {error}")
                else:
                    got[i].append(result.as_numpy("y")[0])
        except Exception as e:
            failures.append(f"{i}: {e!r}")
        finally:
            c.stop_stream()
            c.close()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures[:5]
    for i in range(n):
        expected = eager_steps(quick_store, m, plans[i])
        np.testing.assert_allclose(np.concatenate(got[i]), expected, atol=TOL, rtol=0)
    assert server.server.core.live_sessions(m.name) == 0  # every end flag closed its sequence


# ---- stream lifecycle, expiry, capacity --------------------------------------------------------


def test_half_closed_stream_still_gets_every_reply(client, quick_store):
    m = manifest(quick_store, "seq_gru")
    chunks = random_chunks(m, [1] * 20, seed=90)
    collector = StreamCollector()
    client.start_stream(callback=collector)
    for s, chunk in enumerate(chunks):
        client.async_stream_infer(
            m.name,
            [infer_input(m, chunk)],
            request_id=str(s),
            sequence_id="half-close",
            sequence_start=s == 0,
            sequence_end=s == len(chunks) - 1,
        )
    client.stop_stream()  # half-close right away: tritonclient then waits for the replies
    replies = collector.take(len(chunks), timeout=5)
    got = np.concatenate([replies[str(s)][0].as_numpy("y")[0] for s in range(len(chunks))])
    np.testing.assert_allclose(got, eager_steps(quick_store, m, chunks), atol=TOL, rtol=0)


def test_cancelled_stream_leaves_its_sequence_usable(client, quick_store):
    """Steps already sent either happened or did not, in order; the sequence goes on."""
    m = manifest(quick_store, "sum_sign_rnn")
    chunks = random_chunks(m, [1] * 30, seed=91)
    collector = StreamCollector()
    client.start_stream(callback=collector)
    client.async_stream_infer(
        m.name, [infer_input(m, chunks[0])], sequence_id="cancel", sequence_start=True
    )
    assert collector.replies.get(timeout=30)[1] is None  # the sequence is open
    for chunk in chunks[1:-1]:
        client.async_stream_infer(m.name, [infer_input(m, chunk)], sequence_id="cancel")
    client.stop_stream(cancel_requests=True)
    last = client.infer(
        m.name, [infer_input(m, chunks[-1])], sequence_id="cancel", sequence_end=True
    )
    y_last = last.as_numpy("y")[0, -1]
    # the sequence consumed chunks[:k] for some k before the cancel, then the last chunk
    candidates = [
        eager_steps(quick_store, m, [*chunks[:k], chunks[-1]])[-1] for k in range(1, len(chunks))
    ]
    assert min(np.abs(c - y_last).max() for c in candidates) <= TOL


@pytest.fixture(scope="module")
def tight_server(quick_store: Path) -> Iterator[ServerThread]:
    """A second server with a short TTL and room for two sessions."""
    engine = EngineConfig(store=quick_store, session_ttl_s=0.6, max_sessions=2)
    config = ServerConfig(engine, address="127.0.0.1:0", metrics_port=None, grace_s=1.0)
    with ServerThread(config) as running:
        yield running


def test_expired_sequence_is_told_apart_from_unknown(tight_server, quick_store):
    m = manifest(quick_store, "elman")
    (chunk,) = random_chunks(m, [2], seed=92)
    c = triton.InferenceServerClient(url=tight_server.address)
    try:
        c.infer(m.name, [infer_input(m, chunk)], sequence_id=1, sequence_start=True)
        time.sleep(1.5)  # past the TTL and at least one sweep
        e = error_of(lambda: c.infer(m.name, [infer_input(m, chunk)], sequence_id=1))
        assert e.status() == "StatusCode.NOT_FOUND" and "expired" in e.message()
        again = c.infer(
            m.name, [infer_input(m, chunk)], sequence_id=1, sequence_start=True, sequence_end=True
        )
        np.testing.assert_allclose(
            again.as_numpy("y")[0], eager_steps(quick_store, m, [chunk]), atol=TOL, rtol=0
        )
    finally:
        c.close()


def test_capacity_full_is_resource_exhausted_and_harms_no_open_sequence(tight_server, quick_store):
    m = manifest(quick_store, "sine")
    chunks = {k: random_chunks(m, [2, 2], seed=93 + k) for k in (1, 2)}
    c = triton.InferenceServerClient(url=tight_server.address)
    try:
        first = {
            k: c.infer(m.name, [infer_input(m, ch[0])], sequence_id=k, sequence_start=True)
            for k, ch in chunks.items()
        }
        full = error_of(
            lambda: c.infer(
                m.name, [infer_input(m, chunks[1][0])], sequence_id=3, sequence_start=True
            )
        )
        assert full.status() == "StatusCode.RESOURCE_EXHAUSTED"
        for k, ch in chunks.items():
            last = c.infer(m.name, [infer_input(m, ch[1])], sequence_id=k, sequence_end=True)
            got = np.concatenate([first[k].as_numpy("y")[0], last.as_numpy("y")[0]])
            np.testing.assert_allclose(got, eager_steps(quick_store, m, ch), atol=TOL, rtol=0)
    finally:
        c.close()
