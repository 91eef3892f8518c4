"""Operations: TTL vs unknown, capacity, graceful stop, and `rnnserve serve` as a subprocess."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_support import server_config, to_input

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerThread

RNNSERVE = [sys.executable, "-m", "serving.cli"]


def test_expired_is_not_unknown_and_capacity_is_resource_exhausted(quick_store):
    config = server_config(quick_store, session_ttl_s=0.4, max_sessions=2)
    with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        sids = [stub.OpenSession(pb.OpenSessionRequest(model="sine")).session_id for _ in "ab"]
        with pytest.raises(grpc.RpcError) as full:
            stub.OpenSession(pb.OpenSessionRequest(model="sine"))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity full" in full.value.details()
        time.sleep(0.6)
        x = to_input(np.zeros((1, 1), np.float32))
        for sid, words in ((sids[0], "expired"), ("never-opened", "unknown session")):
            with pytest.raises(grpc.RpcError) as err:
                stub.Step(pb.StepRequest(session_id=sid, input=x))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert words in err.value.details()
        stub.OpenSession(pb.OpenSessionRequest(model="sine"))  # expiry made room


def test_graceful_stop_finishes_in_flight_work_then_refuses(quick_store):
    server = ServerThread(server_config(quick_store)).__enter__()
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.RnnServeStub(channel)
        sids = [stub.OpenSession(pb.OpenSessionRequest(model="sine")).session_id for _ in range(6)]
        x = to_input(np.full((1, 1), 0.5, np.float32))
        streams = [
            stub.Generate(pb.GenerateRequest(session_id=s, prompt=x, max_tokens=150)) for s in sids
        ]
        counts = [0] * len(streams)

        def drain(i: int) -> None:
            for _ in streams[i]:
                counts[i] += 1

        readers = [threading.Thread(target=drain, args=(i,)) for i in range(len(streams))]
        for t in readers:
            t.start()
        time.sleep(0.05)  # generation under way
        server.stop(grace_s=20)
        for t in readers:
            t.join(timeout=30)
        assert counts == [150] * len(streams), "every in-flight stream finished"
        with pytest.raises(grpc.RpcError) as err:
            stub.ListModels(pb.ListModelsRequest(), timeout=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        channel.close()
        server.stop()


# ---- the real CLI ------------------------------------------------------------------------------


def start_serve(env: dict[str, str]) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [*RNNSERVE, "serve", "--address", "127.0.0.1:0", "--metrics-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    found = re.search(r"on (127\.0\.0\.1:\d+), metrics on 127\.0\.0\.1:(\d+)", line)
    if not found:
        proc.kill()
        raise AssertionError(f"serve did not start: {line!r} {proc.stderr.read()}")
    return proc, found.group(1), int(found.group(2))


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*RNNSERVE, *args], capture_output=True, text=True, timeout=60, env=env)


def test_serve_subprocess_health_client_and_sigterm(quick_store, tmp_path):
    env = {**os.environ, "RNNSERVE_STORE": str(quick_store), "RNNSERVE_MAX_BATCH": "32"}
    proc, address, metrics_port = start_serve(env)
    assert metrics_port > 0
    try:
        assert cli("health", "--address", address).returncode == 0
        assert cli("health", "--address", address, "--model", "sine").returncode == 0
        assert cli("health", "--address", address, "--model", "nope").returncode == 1
        stepped = cli("client", "--address", address, "step", "--model", "sum_sign_lstm",
                      "--values", "[[0.9], [0.8]]")  # fmt: skip
        assert stepped.returncode == 0, stepped.stderr
        assert '"label"' in stepped.stdout and '"step_index": 1' in stepped.stdout
        png = tmp_path / "forecast.png"
        history = ["--values", "0,0.3,0.56,0.78", "--steps", "10", "--plot", str(png)]
        forecast = cli("client", "--address", address, "forecast", "--model", "sine", *history)
        assert forecast.returncode == 0, forecast.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"
        bad = cli("client", "--address", address, "step", "--model", "nope", "--values", "1")
        assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr
        nowhere = str(tmp_path / "no-such-folder" / "forecast.png")
        unwritable = cli("client", "--address", address, "forecast", "--model", "sine",
                         "--values", "0,0.3", "--steps", "2", "--plot", nowhere)  # fmt: skip
        assert unwritable.returncode == 2 and "Traceback" not in unwritable.stderr
        assert "no-such-folder" in unwritable.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert cli("health", "--address", address, "--timeout", "1").returncode == 1


def test_serve_refuses_a_corrupt_store(quick_store, tmp_path):
    store = tmp_path / "store"
    for name in ("sine", "sum_sign_lstm"):
        shutil.copytree(quick_store / name, store / name)
    graph = sorted((store / "sum_sign_lstm" / "1").glob("*.onnx"))[0]
    data = bytearray(graph.read_bytes())
    data[len(data) // 3] ^= 0x01  # one flipped bit
    graph.write_bytes(bytes(data))
    result = cli("serve", "--store", str(store), "--address", "127.0.0.1:0", "--metrics-port", "-1")
    assert result.returncode == 3
    assert "refusing to start" in result.stderr and "sha256" in result.stderr
    assert Path(graph).name in result.stderr


def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(tmp_path):
    env = {**os.environ, "RNNSERVE_MAX_BATCH": "lots", "RNNSERVE_MAX_QUEUE_DELAY_MS": "soon"}
    assert cli("--help", env=env).returncode == 0  # builds every parser; converts nothing
    bad = cli("serve", "--store", str(tmp_path), env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "$RNNSERVE_MAX_BATCH" in bad.stderr or "$RNNSERVE_MAX_QUEUE_DELAY_MS" in bad.stderr
    flag = cli("serve", "--store", str(tmp_path), "--max-queue-delay-ms", "-1",
               "--max-batch", "8", env={**env, "RNNSERVE_MAX_QUEUE_DELAY_MS": "0"})  # fmt: skip
    assert flag.returncode == 2 and "--max-queue-delay-ms must be >= 0" in flag.stderr, flag.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["step", "--model", "sine", "--values", "0.1,abc"], "comma-separated numbers"),
        (["step", "--model", "sine", "--values", "[[0.1], [0.2"], "takes JSON"),
        (["forecast", "--model", "sine", "--values", "x"], "takes JSON"),
        (["forecast", "--model", "sine", "--values", "0.1", "--steps", "-1"], "must be >= 0"),
        (["generate", "--model", "char", "--prompt", "a", "--top-k", "-2"], "must be >= 0"),
        (["predict", "--model", "sine", "--values", "[1", "--version", "1"], "takes JSON"),
    ],
)
def test_client_cli_refuses_bad_arguments_in_one_line(args, words):
    """Before any call (the address has no server): a usage error, not a traceback."""
    result = cli("client", "--address", "127.0.0.1:9", *args)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
