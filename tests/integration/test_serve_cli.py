"""``rnnserve serve`` from the command line: errors in the user's terms, a taken port refused
before any model loads, and the access log (one line per gRPC call)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_support import server_config
from ports import free_ports

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.client import Client
from serving.server import ServerThread

CLI = [sys.executable, "-m", "serving.cli"]
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z grpc (?P<method>/\S+) model=(?P<model>\S+) "
    r"status=(?P<status>[A-Z_]+) us=(?P<us>\d+)$"
)


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, "serve", *flags], capture_output=True, text=True, timeout=60, env=env
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1, got 0 (from the flag or $RNNSERVE_"),
        (["--session-ttl", "0"], "--session-ttl must be > 0, got 0.0"),
        (["--backend", "tpu"], "--backend must be one of"),
        (["--model-poll-s", "-1"], "--model-poll-s must be >= 0, got -1.0 (from the flag or $RNN"),
    ],
)
def test_a_bad_setting_names_the_flag(flags: list[str], words: str) -> None:
    out = serve("--store", "/nonexistent", *flags)
    assert out.returncode == 2
    assert out.stderr.startswith("rnnserve serve: ") and words in out.stderr, out.stderr


def test_a_taken_port_is_refused_before_loading_any_model() -> None:
    """The store does not exist: reaching it would be another error. The port is checked first."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        started = time.monotonic()
        out = serve("--store", "/nonexistent", "--address", f"127.0.0.1:{port}")
    assert out.returncode == 4, out.stderr
    assert out.stderr.startswith(
        f"rnnserve serve: --address 127.0.0.1:{port}: port {port} is taken by pid {os.getpid()} ("
    ), out.stderr
    assert time.monotonic() - started < 30


def test_a_taken_metrics_port_is_refused_too() -> None:
    grpc_port, metrics = free_ports(2)
    with socket.socket() as held:
        held.bind(("127.0.0.1", metrics))
        held.listen()
        out = serve(
            "--store", "/nonexistent", "--address", f"127.0.0.1:{grpc_port}",
            "--metrics-port", str(metrics),
        )  # fmt: skip
    assert out.returncode == 4
    assert f"--metrics-port {metrics}: port {metrics} is taken by pid {os.getpid()}" in out.stderr


def test_the_access_log_writes_one_line_per_call(quick_store: Path) -> None:
    lines: list[str] = []
    config = replace(server_config(quick_store), access_log=True, access_log_sink=lines.append)
    with ServerThread(config) as server, Client(server.address) as client:
        client.models()
        with client.session("sum_sign_lstm") as s:
            s.step([[0.5]])
            with pytest.raises(grpc.RpcError):
                s.step([[0.5, 1.0]])  # two features to a one-feature model
        with client.session("sine") as s:
            assert len(list(s.generate([[0.0], [0.3]], max_tokens=3))) == 3
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest())
        with pytest.raises(grpc.RpcError):
            client.stub.Step(pb.StepRequest(session_id="no-such-session"))
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = [(m["method"].rsplit("/", 1)[1], m["model"], m["status"]) for m in parsed if m]
    assert got == [
        ("ListModels", "-", "OK"),
        ("OpenSession", "sum_sign_lstm", "OK"),
        ("Step", "sum_sign_lstm", "OK"),
        ("Step", "sum_sign_lstm", "INVALID_ARGUMENT"),
        ("CloseSession", "sum_sign_lstm", "OK"),
        ("OpenSession", "sine", "OK"),
        ("Generate", "sine", "OK"),
        ("CloseSession", "sine", "OK"),
        ("Check", "-", "OK"),
        ("Step", "-", "NOT_FOUND"),
    ]
    assert all(int(m["us"]) > 0 for m in parsed if m)


def test_serve_access_log_flag_and_variable(quick_store: Path) -> None:
    """Off by default; --access-log or RNNSERVE_ACCESS_LOG=1 turns it on."""
    for flags, env, expect in (
        ([], {}, False),
        (["--access-log"], {}, True),
        ([], {"RNNSERVE_ACCESS_LOG": "1"}, True),
        (["--no-access-log"], {"RNNSERVE_ACCESS_LOG": "1"}, False),
    ):
        stderr = serve_one_call(quick_store, flags, env)
        lines = [line for line in stderr.splitlines() if LINE.match(line)]
        assert bool(lines) == expect, (flags, env, stderr)
        if expect:
            assert any("/rnnserve.v1.RnnServe/ListModels model=- status=OK" in x for x in lines)


def serve_one_call(store: Path, flags: list[str], env: dict[str, str]) -> str:
    (port,) = free_ports(1)
    argv = [*CLI, "serve", "--store", str(store), "--address", f"127.0.0.1:{port}"]
    argv += ["--metrics-port", "-1"]
    proc = subprocess.Popen(
        [*argv, *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RNNSERVE_ACCESS_LOG": "", **env},
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with Client(f"127.0.0.1:{port}", timeout=2) as client:
                    client.models()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    return stderr
