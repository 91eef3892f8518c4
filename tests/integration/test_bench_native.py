"""The bench's C++ tools, built and run: the C++ echo server answers every rnnserve.v1 and OIP form
exactly as the Python server encodes a zero output (canned from the store's manifest), and
load_client drives it closed-loop for about a second on each path without a failed step."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from bench import echo_server, native_tools, run
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import make_input, pack_steps
from serving.manifest import load_manifest, resolve

FEATURES = 10

pytestmark = pytest.mark.skipif(
    bool(native_tools.missing_build_tools()),
    reason=f"cannot build bench/native: missing {', '.join(native_tools.missing_build_tools())}",
)


@pytest.fixture(scope="module")
def tools() -> dict[str, Path]:
    return native_tools.ensure_built()


@pytest.fixture(scope="module")
def echo(tools: dict[str, Path], quick_store: Path, tmp_path_factory) -> Iterator[run.Server]:
    canned = native_tools.write_canned(quick_store, "seq_lstm", tmp_path_factory.mktemp("canned"))
    server = run.Server("echo", native_tools.echo_command(tools["echo_server"], canned), {})
    server.start(timeout=30)
    yield server
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0  # stopped by SIGTERM, cleanly


def test_the_echo_answers_rnnserve_v1_as_the_python_server_encodes_it(echo, quick_store) -> None:
    expected = echo_server.canned_reply(load_manifest(resolve(quick_store, "seq_lstm")))
    with grpc.insecure_channel(echo.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        ids = [stub.OpenSession(pb.OpenSessionRequest(model="seq_lstm")).session_id for _ in "ab"]
        assert len(set(ids)) == 2 and all(len(i) == 22 for i in ids)  # a real id's length
        x = make_input(np.zeros((2, FEATURES)))  # (T=2, F)
        reply = stub.Step(pb.StepRequest(session_id=ids[0], step_index=7, input=x))
        assert (reply.session_id, reply.step_index) == (ids[0], 7)
        assert list(reply.outputs) == [expected.outputs[0]] * 2  # one output per time step
        steps = [pb.StepRequest(session_id=ids[1], step_index=i, input=x) for i in range(3)]
        streamed = list(stub.Session(iter(steps)))
        assert [r.step_index for r in streamed] == [0, 1, 2]
        assert {r.session_id for r in streamed} == {ids[1]}
        block = pack_steps("seq_lstm", ids, np.zeros((2, 1, FEATURES)), [4, 5])
        [packed] = stub.StepMany(iter([pb.StepManyRequest(packed=block)]))
        m = load_manifest(resolve(quick_store, "seq_lstm"))
        assert list(packed.packed.step_indexes) == [4, 5]
        assert len(packed.packed.raw) == 4 * 2 * m.output.size
        assert len(packed.packed.probabilities) == 4 * 2 * len(m.labels)
        with pytest.raises(grpc.RpcError) as refused:
            stub.OpenSession(pb.OpenSessionRequest(model="nope"))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_echo_answers_the_oip_with_the_real_shapes(echo, quick_store) -> None:
    m = load_manifest(resolve(quick_store, "seq_lstm"))
    client = triton.InferenceServerClient(echo.address)
    assert client.is_server_live() and client.is_model_ready("seq_lstm")
    config = client.get_model_config("seq_lstm").config
    assert config.sequence_batching.max_sequence_idle_microseconds > 0
    x = triton.InferInput("x", [1, 3, FEATURES], "FP32")
    x.set_data_from_numpy(np.ones((1, 3, FEATURES), np.float32))
    result = client.infer("seq_lstm", [x], sequence_id=9, sequence_start=True)
    assert result.as_numpy("y").shape == (1, 3, m.output.size)
    assert result.as_numpy("probabilities").shape == (1, 3, len(m.labels))
    assert result.as_numpy("label").shape == (1, 3)
    client.close()


@pytest.mark.parametrize("path", ["unary", "stream", "packed"])
def test_load_client_drives_the_echo_for_a_second(echo, tools, path: str) -> None:
    sessions = 70  # packed: a message of 64 and one of 6
    command = native_tools.load_command(
        tools["load_client"], echo.address, "seq_lstm", FEATURES, path, sessions,
        warmup=0.2, duration=0.8,
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    result = native_tools.parse_load(done.stdout)
    assert result.ok, result.first_error
    assert (result.path, result.sessions) == (path, sessions)
    if path == "packed":  # messages of 64 and of 6 sessions
        assert 6 * result.messages < result.steps < 64 * result.messages
    else:
        assert result.steps == result.messages
    assert result.steps_per_s > 100 and 0 < result.p50_us <= result.p99_us


def test_load_client_reports_a_server_that_is_not_there(tools) -> None:
    command = native_tools.load_command(tools["load_client"], "127.0.0.1:1", "seq_lstm", FEATURES,
                                        "stream", 2, duration=0.2)  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    with pytest.raises(RuntimeError, match="OpenSession: gRPC 14"):
        native_tools.parse_load(done.stdout)
