"""The real TorchServe 0.12 (Java frontend + Python workers) serving every zoo model.

Started with ``rnnserve torchserve start`` on free loopback ports, with archives built for this run
(batchSize 4 and a 1 s maxBatchDelay, so concurrent requests are reliably batched together and
every reply says how large its batch was). Predictions are compared with the eager PyTorch
reference run on each request alone; bad requests share a batch with good ones; and ``stop`` must
leave no Java or worker process behind.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch
from http_reference import (
    assert_matches,
    eager_alone,
    eager_rollout,
    random_body,
)
from ports import free_ports

from serving.manifest import Manifest, load_manifest, resolve
from serving.torchserve import control
from training.reference import load_eager
from training.zoo import ZOO

CLI = [sys.executable, "-m", "serving.cli"]
BATCH = 4


@dataclass(frozen=True)
class Server:
    store: Path
    url: str  # inference API
    management: str  # unix:/path/to/socket
    metrics: str
    run_dir: Path


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # Java listens on ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


def torchserve_processes(run_dir: Path) -> list[psutil.Process]:
    """The frontend and its workers: both name the run folder on their command lines."""
    found = []
    for p in psutil.process_iter():
        try:
            if str(run_dir) in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def server(quick_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    store = tmp_path_factory.mktemp("ts_store")
    for name in ZOO:  # the quick store is read-only: link its models, write archives here
        (store / name).symlink_to(quick_store / name, target_is_directory=True)
    archive = [*CLI, "archive", "--store", str(store)]
    subprocess.run([*archive, "--batch-size", str(BATCH), "--max-batch-delay", "1000"], check=True)
    ports = free_ports(4)
    flags = [
        "--inference-port",
        "--metrics-port",
        "--grpc-inference-port",
        "--grpc-management-port",
    ]
    port_args = [a for pair in zip(flags, map(str, ports), strict=True) for a in pair]
    start = [*CLI, "torchserve", "start", "--store", str(store), *port_args, "--timeout", "300"]
    run_dir = control.run_dir(store)
    try:
        subprocess.run(start, check=True, timeout=360)
        yield Server(
            store,
            f"http://127.0.0.1:{ports[0]}",
            control.default_management(store),
            f"http://127.0.0.1:{ports[1]}",
            run_dir,
        )
    finally:
        subprocess.run([*CLI, "torchserve", "stop", "--store", str(store)], timeout=120)
        for p in torchserve_processes(run_dir):  # never leak a JVM, even when a test failed
            p.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def models(quick_store: Path) -> dict[str, tuple[Manifest, torch.nn.Module]]:
    out = {}
    for name in ZOO:
        version_dir = resolve(quick_store, name)
        out[name] = (load_manifest(version_dir), load_eager(version_dir))
    return out


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or None when the body was empty
    batch: int  # how many requests shared the batch (0 when the frontend answered alone)


def post(server: Server, model: str, body: Any) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = requests.post(
        f"{server.url}/predictions/{model}",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    parsed = r.json() if r.content else None
    return Reply(r.status_code, parsed, int(r.headers.get("x-rnnserve-batch-size", 0)))


def post_together(server: Server, model: str, bodies: list[Any]) -> list[Reply]:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: post(server, model, b), bodies))


# ---- the reference (decoded and computed here, independent of the serving code) --------------


# ---- tests ------------------------------------------------------------------------------------


def management(server: Server, method: str, path: str) -> tuple[int, Any]:
    status, body = control.call_management(server.management, method, path)
    return status, json.loads(body)


def workers(server: Server, model: str) -> int:
    status, described = management(server, "GET", f"/models/{model}")
    assert status == 200
    return len(described[0]["workers"])


def test_every_model_is_ready_and_loopback_only(server: Server) -> None:
    assert requests.get(f"{server.url}/ping", timeout=10).json()["status"] == "Healthy"
    status, listed = management(server, "GET", "/models")
    assert status == 200 and sorted(m["modelName"] for m in listed["models"]) == sorted(ZOO)
    frontend = control.running_frontend(server.store)
    assert frontend is not None
    listening = [c for c in frontend.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    assert len(listening) == 4  # inference, metrics, TorchServe's two gRPC APIs; no management
    assert all(is_loopback(c.laddr.ip) for c in listening), listening
    status, _ = management(server, "POST", "/models?url=x.mar")
    assert status >= 400  # the model API is off


def test_no_tcp_port_lets_an_anonymous_client_scale_a_model_to_zero(server: Server) -> None:
    """Once, `PUT /models/sine?min_worker=0` on 127.0.0.1:8081 scaled sine to zero workers and
    its predictions answered 503. The management API now listens on a Unix socket only, in a
    folder only this user may open; every TCP port TorchServe listens on refuses the call."""
    frontend = control.running_frontend(server.store)
    assert frontend is not None
    ports = [c.laddr.port for c in frontend.net_connections("inet") if c.status == "LISTEN"]
    for port in ports:
        try:
            reply = requests.put(f"http://127.0.0.1:{port}/models/sine?min_worker=0", timeout=10)
        except requests.RequestException:
            continue  # not HTTP/1.1 (TorchServe's gRPC ports): no answer at all
        assert reply.status_code >= 400, (port, reply.text)
    assert workers(server, "sine") == 1
    assert post(server, "sine", {"inputs": [[0.5]]}).status == 200
    socket_path = Path(server.management.removeprefix("unix:"))
    assert socket_path.is_socket() and socket_path.parent == server.run_dir
    assert server.run_dir.stat().st_mode & 0o077 == 0  # nobody else may reach the socket


@pytest.mark.parametrize("name", list(ZOO))
def test_concurrent_mixed_lengths_equal_each_request_alone(server: Server, models, name: str):
    m, eager = models[name]
    rng = np.random.default_rng(len(name))
    bodies = [random_body(m, int(t), rng) for t in rng.integers(1, 60, size=2 * BATCH)]
    replies = post_together(server, name, bodies)
    for reply, body in zip(replies, bodies, strict=True):
        assert reply.status == 200, reply.body
        assert_matches(m, reply.body, eager_alone(eager, m, body))
    assert max(r.batch for r in replies) > 1  # they really were served in batches


def test_many_clients_on_one_model(server: Server, models) -> None:
    m, eager = models["seq_lstm"]
    rng = np.random.default_rng(3)
    bodies = [random_body(m, int(t), rng) for t in rng.integers(1, 50, size=24)]
    replies = post_together(server, "seq_lstm", bodies)
    for reply, body in zip(replies, bodies, strict=True):
        assert reply.status == 200
        assert_matches(m, reply.body, eager_alone(eager, m, body))
    assert sum(r.batch == BATCH for r in replies) >= BATCH


def test_char_generation_and_sine_forecast(server: Server, models) -> None:
    m, eager = models["char"]
    body = {"text": "The ", "generate": 40}
    (reply,) = post_together(server, "char", [body])
    assert reply.status == 200
    expected = "".join((m.input.vocab or [])[i] for i in eager_rollout(eager, m, body, 40))
    assert reply.body["generated"] == expected
    m, eager = models["sine"]
    body = {"inputs": np.sin(np.arange(20) * 0.157).reshape(-1, 1).tolist(), "horizon": 30}
    (reply,) = post_together(server, "sine", [body])
    assert reply.body["forecast"] == pytest.approx(eager_rollout(eager, m, body, 30), abs=1e-3)


BAD: list[tuple[str, str, Any, int, str]] = [  # (case, model, body, status, words)
    ("malformed JSON", "sum_sign_lstm", b'{"inputs": [[0.5]', 400, "not valid JSON"),
    ("missing field", "sum_sign_lstm", {}, 400, 'missing field "inputs"'),
    ("wrong feature count", "seq_lstm", {"inputs": [[0.5] * 3]}, 400, "expects 10 features"),
    ("NaN", "sum_sign_lstm", b'{"inputs": [[NaN]]}', 400, "NaN or Inf"),
    ("Infinity", "elman", b'{"inputs": [[-Infinity]]}', 400, "NaN or Inf"),
    ("empty sequence", "sum_sign_rnn", {"inputs": []}, 400, "empty input"),
    ("over-long sequence", "seq_gru", {"inputs": [[0.0] * 10] * 1025}, 400, "at most 1024"),
    ("over-long body", "sine", b'{"inputs": [' + b"[0.5]," * 200_000 + b"[0.5]]}", 413, "limit"),
    ("unknown characters", "char", {"text": "caf\u00e9\u2603"}, 400, "outside char's vocab"),
    ("empty body", "seq_bilstm", b"", 400, "no JSON body"),
    (  # once ignored: the features were answered as if "text" was not there
        "text to a feature model",
        "seq_lstm",
        {"inputs": [[0.5] * 10], "text": "hi"},
        400,
        '"text" is for text/token models: seq_lstm takes feature vectors, not text/tokens',
    ),
    (
        "inputs to a char model",
        "char",
        {"text": "The ", "inputs": [[0.5]]},
        400,
        "char takes text/tokens, not feature vectors; char accepts text, tokens, generate, top_k",
    ),
]


@pytest.mark.parametrize(("case", "model", "body", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_in_a_batch_fails_alone(
    server: Server, models, case: str, model: str, body: Any, status: int, words: str
) -> None:
    m, eager = models[model]
    rng = np.random.default_rng(11)
    good = [random_body(m, int(t), rng) for t in (5, 1, 17)]
    replies = post_together(server, model, [good[0], body, good[1], good[2]])
    bad = replies[1]
    assert bad.status == status, bad.body
    assert words in bad.body["error"] and bad.body["status"] == status
    assert [r.batch for r in replies] == [BATCH] * BATCH, "the four did not share one batch"
    for reply, g in zip([replies[0], *replies[2:]], good, strict=True):
        assert reply.status == 200
        assert_matches(m, reply.body, eager_alone(eager, m, g))


def test_what_the_frontend_refuses_before_any_worker(server: Server) -> None:
    unknown = post(server, "no_such_model", {"inputs": [[0.5]]})
    assert unknown.status == 404 and "no_such_model" in unknown.body["message"]
    huge = post(server, "sine", b" " * (9 << 20))  # past max_request_size (8 MiB)
    assert huge.status == 413
    assert post(server, "sine", {"inputs": [[0.5]]}).status == 200  # still serving


def test_start_refuses_a_second_frontend_for_the_same_store(server: Server) -> None:
    again = subprocess.run(
        [*CLI, "torchserve", "start", "--store", str(server.store)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode != 0 and "already running" in again.stderr


def test_stop_leaves_no_java_or_worker_process(server: Server) -> None:
    before = torchserve_processes(server.run_dir)
    assert len(before) == 1 + len(ZOO)  # one frontend, one worker per model
    stopped = subprocess.run(
        [*CLI, "torchserve", "stop", "--store", str(server.store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not [p for p in before if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert torchserve_processes(server.run_dir) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/ping", timeout=5)
