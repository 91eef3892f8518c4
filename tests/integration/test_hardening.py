"""Hostile-client behaviour over the wire (issue 13): every case is a black-box call on a channel.

Bounded memory for Predict (checked by the server process's RSS), overload answered with a status
instead of silent CANCELLED, OIP replies refused by their size before computing, malformed
protobuf answered INVALID_ARGUMENT on every RPC of both services with rate-limited logging,
numbers that parse oddly, and a metrics endpoint that serves only /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from eager import Reference
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import manifest, raw, server_config, to_input

from serving import oip_api
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerThread

OIP = oip_api.pb
OIP_SERVICE = oip_api.DESCRIPTOR_POOL.FindServiceByName("inference.GRPCInferenceService")
OUR_SERVICE = pb.DESCRIPTOR.services_by_name["RnnServe"]
MIB = 2**20
MAX_MESSAGE = 4 * MIB
OVERLOAD_LIMIT = 300  # --max-concurrent-rpcs of the subprocess server


# ---- servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    with ServerThread(server_config(quick_store)) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


class ServeProcess:
    """`rnnserve serve` in a subprocess: its RSS is the server's alone."""

    def __init__(self, store: Path, *flags: str) -> None:
        env = {**os.environ, "RNNSERVE_STORE": str(store)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.cli", "serve", "--address", "127.0.0.1:0",
             "--metrics-port", "0", *flags],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = self.proc.stdout.readline()
        found = re.search(r"on (127\.0\.0\.1:\d+), metrics on 127\.0\.0\.1:(\d+)", line)
        if not found:
            self.proc.kill()
            raise AssertionError(f"serve did not start: {line!r} {self.proc.stderr.read()}")
        self.address, self.metrics_port = found.group(1), int(found.group(2))
        self.process = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def stop(self) -> str:
        """Stops the server; returns its stderr (the log)."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture(scope="module")
def served(quick_store: Path) -> Iterator[ServeProcess]:
    s = ServeProcess(quick_store, "--max-concurrent-rpcs", str(OVERLOAD_LIMIT))
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# ---- 1. Predict pads within bounds and gives its memory back ---------------------------------


def token_rows(lengths: list[int], vocab: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=t).astype(np.int64) for t in lengths]


def predict(stub, model: str, rows: list[np.ndarray], timeout: float = 120) -> np.ndarray:
    reply = stub.Predict(
        pb.PredictRequest(model=model, inputs=[to_input(r) for r in rows]), timeout=timeout
    )
    return raw(reply)  # (B, O)


def test_predict_of_one_long_row_among_short_ones_returns_its_memory(served, quick_store):
    m = manifest(quick_store, "char")
    rows = token_rows([1024] + [1] * 63, len(m.input.vocab), seed=1)
    with grpc.insecure_channel(served.address) as ch:
        stub = pb_grpc.RnnServeStub(ch)
        predict(stub, "char", token_rows([8, 3], len(m.input.vocab), seed=2))  # warm
        before = served.rss()
        y = predict(stub, "char", rows)
        after = served.rss()
    np.testing.assert_allclose(y, Reference(quick_store).sequence("char", rows), atol=1e-5)
    print(f"char 1x1024 + 63x1: RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB")
    assert after - before < 32 * MIB  # main padded every row to 1,024 and kept +292 MiB


def test_predict_of_many_long_rows_stays_bounded_and_returns_its_memory(served, quick_store):
    rng = np.random.default_rng(3)
    rows = [rng.normal(size=(1024, 10)).astype(np.float32) for _ in range(32)]  # 1.3 MB
    with grpc.insecure_channel(served.address) as ch:
        stub = pb_grpc.RnnServeStub(ch)
        predict(stub, "seq_lstm", rows[:1])  # warm
        before = served.rss()
        y = predict(stub, "seq_lstm", rows)
        after = served.rss()
    # 1,024 float32 steps of ORT against eager PyTorch drift a little past 1e-5 (seen 1.2e-5)
    np.testing.assert_allclose(y, Reference(quick_store).sequence("seq_lstm", rows), atol=5e-5)
    print(f"seq_lstm 32x1024: RSS {before / MIB:.0f} -> {after / MIB:.0f} MiB")
    assert after - before < 32 * MIB  # main kept +150 MiB (ORT's arena at its largest call)


def test_a_predict_over_the_step_budget_is_refused_naming_the_limit(channel):
    stub = pb_grpc.RnnServeStub(channel)
    tokens = pb.Input(tokens=pb.Tokens(ids=[1] * 1024))
    request = pb.PredictRequest(model="char", inputs=[tokens] * 257)  # 263,168 steps
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "263168 time steps" in err.value.details() and "at most 262144" in err.value.details()


# ---- 2. many concurrent calls: answered, or refused with a status ----------------------------


async def concurrent_calls(address: str, n: int, make_call) -> Counter:
    async with grpc.aio.insecure_channel(address) as ch:

        async def one(i: int) -> str:
            try:
                await make_call(ch, i)
            except grpc.aio.AioRpcError as e:
                return f"{e.code().name}: {e.details()}"
            return "OK"

        return Counter(await asyncio.gather(*(one(i) for i in range(n))))


def health_check(ch, i):
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=60)


def list_models(ch, i):
    return pb_grpc.RnnServeStub(ch).ListModels(pb.ListModelsRequest(), timeout=60)


def test_five_thousand_concurrent_health_checks_and_unary_calls_are_all_answered(served):
    for make_call, n in ((health_check, 5000), (list_models, 2000)):
        outcomes = asyncio.run(concurrent_calls(served.address, n, make_call))
        print(make_call.__name__, n, dict(outcomes))
        assert outcomes == Counter({"OK": n})  # main: 1,700 of 5,000 CANCELLED


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def hold_streams_then_call(address: str, sessions: list[str], extra: int) -> tuple:
    """Hold one open Session stream per session (each answered one step, so the server has
    admitted it), make ``extra`` ListModels and health calls meanwhile, then close the
    streams and make one more ListModels."""
    x = to_input(np.full((1, 1), 0.5, np.float32))
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RnnServeStub(ch)
        streams = [stub.Session(timeout=60) for _ in sessions]
        for stream, sid in zip(streams, sessions, strict=True):
            await stream.write(pb.StepRequest(session_id=sid, input=x))
        await asyncio.gather(*(stream.read() for stream in streams))
        during = await concurrent_calls(address, extra, list_models)
        health = await concurrent_calls(address, extra, health_check)
        for stream in streams:
            await stream.done_writing()
        await asyncio.gather(*(stream.wait_for_connection() for stream in streams))
        for stream in streams:
            await stream.code()
        after = await concurrent_calls(address, 1, list_models)
    return during, health, after


def test_past_the_rpc_limit_calls_are_refused_with_resource_exhausted_logged_and_counted(
    quick_store,
):
    served = ServeProcess(quick_store, "--max-concurrent-rpcs", str(OVERLOAD_LIMIT))
    try:
        with grpc.insecure_channel(served.address) as ch:
            stub = pb_grpc.RnnServeStub(ch)
            sessions = [
                stub.OpenSession(pb.OpenSessionRequest(model="sine")).session_id
                for _ in range(OVERLOAD_LIMIT)
            ]
        during, health, after = asyncio.run(hold_streams_then_call(served.address, sessions, 200))
        refused = metric(served.metrics_port, "rnnserve_refused_rpcs_total", reason="overloaded")
    finally:
        log = served.stop()
    print(dict(during), f"refused in metrics: {refused}")
    (message,) = during  # every call refused, with one message
    assert during[message] == 200 and message.startswith("RESOURCE_EXHAUSTED")
    assert f"{OVERLOAD_LIMIT} RPCs in flight, the limit is {OVERLOAD_LIMIT}" in message
    assert refused == 200
    assert health == Counter({"OK": 200})  # health checks are exempt
    assert after == Counter({"OK": 1})  # the streams ended: room again
    overload_lines = [line for line in log.splitlines() if "server overloaded" in line]
    assert len(overload_lines) == 1, overload_lines  # one line per 10 s, with a count
    assert "(1 of these since the last report)" in overload_lines[0]


# ---- 3. OIP replies over the message limit are refused before computing ----------------------


def raw_infer(model: str, datatype: str, shape: list[int], data: bytes, **params) -> object:
    request = OIP.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT", datatype=datatype, shape=shape)
    request.raw_input_contents.append(data)
    for key, value in params.items():
        setattr(request.parameters[key], "int64_param" if key == "sequence_id" else "bool_param",
                value)  # fmt: skip
    return request


def oip_unary(channel, name: str):
    method = OIP_SERVICE.methods_by_name[name]
    response = oip_api.pb.__dict__[method.output_type.name]
    return channel.unary_unary(
        f"/{OIP_SERVICE.full_name}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )


def test_an_oip_reply_over_the_message_limit_is_refused_before_computing(channel, quick_store):
    ref = Reference(quick_store)
    m = manifest(quick_store, "sine")
    rng = np.random.default_rng(5)
    chunks = [rng.normal(size=(3, 1)).astype(np.float32) for _ in range(2)]
    stub = pb_grpc.RnnServeStub(channel)
    neighbour = stub.OpenSession(pb.OpenSessionRequest(model=m.name)).session_id
    first = raw(stub.Step(pb.StepRequest(session_id=neighbour, input=to_input(chunks[0]))))
    tokens = np.ones((8, 1024), "<i8")  # 65 kB in, 8 x 1024 steps x 103 x 2 floats out
    infer = oip_unary(channel, "ModelInfer")
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        infer(raw_infer("char", "INT64", [8, 1024], tokens.tobytes()), timeout=30)
    elapsed = time.perf_counter() - started
    print(f"refused in {elapsed * 1000:.0f} ms: {err.value.details()}")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the limit is {MAX_MESSAGE} bytes" in err.value.details()
    assert elapsed < 1.0  # main computed 2.7 s first, then failed
    fits = infer(raw_infer("char", "INT64", [1, 1024], tokens[0].tobytes()), timeout=30)
    assert fits.outputs[0].shape == [1, 1024, 103]
    second = raw(stub.Step(pb.StepRequest(session_id=neighbour, input=to_input(chunks[1]))))
    np.testing.assert_allclose(np.concatenate([first, second]), ref.run(m.name, chunks), atol=1e-5)


@pytest.mark.parametrize("form", ["steps", "packed"])
def test_a_step_many_reply_over_the_message_limit_is_refused_before_any_step(
    channel, quick_store, form
):
    """64 char sessions x 1,024 tokens: 68 kB in, 31 MB out (main: 2.7 s, +453 MiB, every
    session stepped, then RESOURCE_EXHAUSTED)."""
    m = manifest(quick_store, "char")
    stub = pb_grpc.RnnServeStub(channel)
    sids = [stub.OpenSession(pb.OpenSessionRequest(model="char")).session_id for _ in range(64)]
    tokens = token_rows([1024], len(m.input.vocab), seed=6)[0]
    if form == "steps":
        entry = pb.Input(tokens=pb.Tokens(ids=tokens.tolist()))
        message = pb.StepManyRequest(
            steps=[pb.StepRequest(session_id=s, input=entry) for s in sids]
        )
    else:
        packed = pb.PackedSteps(model="char", session_ids=sids, steps=1024)
        packed.tokens.extend(np.tile(tokens, 64).tolist())
        message = pb.StepManyRequest(packed=packed)
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StepMany(iter([message]), timeout=30))
    elapsed = time.perf_counter() - started
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert f"the limit is {MAX_MESSAGE} bytes" in err.value.details()
    assert elapsed < 1.0
    short = pb.Input(tokens=pb.Tokens(ids=tokens[:256].tolist()))
    fits = [pb.StepRequest(session_id=s, input=short, step_index=0) for s in sids[:4]]
    (reply,) = stub.StepMany(iter([pb.StepManyRequest(steps=fits)]), timeout=30)
    ref = Reference(quick_store).run("char", [tokens[:256]])
    for result in reply.results:  # step 0 runs now: the refused message stepped no session
        assert result.reply.step_index == 0
        np.testing.assert_allclose(raw(result.reply), ref, atol=1e-5)


# ---- 4 and 5. malformed protobuf: INVALID_ARGUMENT everywhere, quiet logs --------------------

GARBAGE = b"\xff\xff\xff"  # a truncated varint tag: no message type parses it


def every_method() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every RPC of both services."""
    return [
        (f"/{service.full_name}/{method.name}", method.client_streaming, method.server_streaming)
        for service in (OUR_SERVICE, OIP_SERVICE)
        for method in service.methods
    ]


def call_raw(channel, path: str, client_streaming: bool, server_streaming: bool, messages):
    """Send raw request bytes; return (status code, replies)."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    call = kind(path)  # no serializers: bytes on the wire as given
    request = iter(messages) if client_streaming else messages[0]
    try:
        replies = call(request, timeout=5)
        replies = list(replies) if server_streaming else [replies]
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, replies


@pytest.mark.parametrize(("path", "client_streaming", "server_streaming"), every_method())
def test_malformed_bytes_are_invalid_argument_on_every_rpc(
    channel, path, client_streaming, server_streaming
):
    code, details = call_raw(channel, path, client_streaming, server_streaming, [GARBAGE])
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)  # main: UNKNOWN / INTERNAL
    assert "malformed request" in details


def test_malformed_bytes_log_one_line_per_interval_without_tracebacks(quick_store, caplog):
    caplog.set_level(logging.INFO)
    with (
        ServerThread(server_config(quick_store)) as fresh,
        grpc.insecure_channel(fresh.address) as ch,
    ):
        for _ in range(50):
            for path, cs, ss in every_method():
                call_raw(ch, path, cs, ss, [GARBAGE])
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    print(f"{len(records)} log records for {50 * len(every_method())} malformed calls")
    assert all(r.exc_info is None for r in records)  # main: a 700-byte traceback each
    assert len(records) == 1, [r.getMessage() for r in records]
    assert "malformed" in records[0].getMessage()


def test_invalid_utf8_strings_log_one_protobuf_line_per_interval(quick_store):
    # protobuf's parser logs each string field that is not UTF-8 itself, below our handlers
    bad_id = b"\x0a\x01\xff"  # StepRequest.session_id = b"\xff"
    bad_name = b"\x0a\x01\xfe"  # ModelInferRequest.model_name = b"\xfe"
    served = ServeProcess(quick_store)
    try:
        with grpc.insecure_channel(served.address) as ch:
            codes = Counter(
                call_raw(ch, path, False, False, [body])[0]
                for _ in range(100)
                for path, body in (
                    (f"/{OUR_SERVICE.full_name}/Step", bad_id),
                    (f"/{OIP_SERVICE.full_name}/ModelInfer", bad_name),
                )
            )
    finally:
        log = served.stop()
    assert codes == Counter({grpc.StatusCode.INVALID_ARGUMENT: 200})
    lines = [line for line in log.splitlines() if "invalid UTF-8" in line]
    print("\n".join(lines))
    assert len(lines) == 1, lines  # one a parse site and interval (before: one a call, 200)
    assert "serving.core: protobuf: String field" in lines[0]
    assert "(1 of these since the last report)" in lines[0]


def test_a_malformed_message_inside_model_stream_infer_fails_the_stream(channel, quick_store):
    request = raw_infer("sine", "FP32", [1, 2, 1], np.ones(2, "<f4").tobytes())
    code, details = call_raw(
        channel,
        f"/{OIP_SERVICE.full_name}/ModelStreamInfer",
        True,
        True,
        [request.SerializeToString(), GARBAGE, request.SerializeToString()],
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)  # main: OK, one reply
    assert "malformed request" in details


# ---- 6. numbers that parse oddly -------------------------------------------------------------


@pytest.mark.parametrize("version", ["²", "١", "1.0", "-1", "0", " 1", "9" * 5000])
def test_an_odd_model_version_is_invalid_argument(channel, version):
    for name, request in (
        ("ModelReady", OIP.ModelReadyRequest(name="sine", version=version)),
        ("ModelMetadata", OIP.ModelMetadataRequest(name="sine", version=version)),
        ("ModelInfer", OIP.ModelInferRequest(model_name="sine", model_version=version)),
    ):
        with pytest.raises(grpc.RpcError) as err:
            oip_unary(channel, name)(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
        assert "model_version must be a positive integer" in err.value.details()
        assert len(err.value.details()) < 200


@pytest.mark.parametrize(
    "shape",
    [
        [0, 2**62, 10], [1, 2**62, 10], [2**62, 1, 10], [1, 1, 2**62], [2**63 - 1, 0, 10],
        [1, 0, 2**62], [2**31, 2**31, 0],
    ],
)  # fmt: skip
def test_an_absurd_shape_is_invalid_argument(channel, shape):
    request = OIP.ModelInferRequest(model_name="seq_lstm")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    for data in (None, b""):
        if data is not None:
            request.raw_input_contents.append(data)
        with pytest.raises(grpc.RpcError) as err:
            oip_unary(channel, "ModelInfer")(request, timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value  # main: INTERNAL


# ---- 7. the metrics endpoint serves /metrics only --------------------------------------------


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/metrics/x", "/debug", "/metrics?x=1#"])
def test_the_metrics_endpoint_answers_only_metrics(server, path):
    base = f"http://127.0.0.1:{server.server.metrics_port}"
    assert b"rnnserve_requests_total" in urllib.request.urlopen(base + "/metrics").read()
    if path.startswith("/metrics?"):
        assert urllib.request.urlopen(base + path).status == 200  # a query is still /metrics
        return
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + path, timeout=10)
    assert err.value.code == 404  # main: the metrics page (or an empty 200) on every path
