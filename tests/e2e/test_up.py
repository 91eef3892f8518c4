"""The main job end to end: `rnnserve up` on a trained store starts both services, proves a real
call through each, prints how to call them, and leaves no process behind; a second `up` harms
nothing of the first; a dying child is noticed, named, and the rest is stopped."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from ports import free_ports

from serving.health_cmd import check
from serving.torchserve import control

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "serving.cli"]
PORT_FLAGS = [
    "--grpc-port", "--metrics-port", "--http-port", "--ts-metrics-port", "--ts-grpc-port",
    "--ts-grpc-management-port",
]  # fmt: skip


def up_command(store: Path, ports: list[int], *extra: str) -> list[str]:
    flags = [a for pair in zip(PORT_FLAGS, map(str, ports), strict=True) for a in pair]
    return [*CLI, "up", "--store", str(store), *flags, *extra]


def store_copy(quick_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(quick_store, store, ignore=shutil.ignore_patterns("torchserve"))
    return store


def started_since(before: set[int], store: Path) -> list[dict]:
    return [
        p.info
        for p in psutil.process_iter(["pid", "name", "cmdline"])
        if p.pid not in before and str(store) in " ".join(p.info["cmdline"] or [])
    ]


def test_up_serves_grpc_and_http_then_stops_cleanly(quick_store: Path, tmp_path: Path) -> None:
    store = store_copy(quick_store, tmp_path)
    ports = free_ports(len(PORT_FLAGS))
    before = {p.pid for p in psutil.process_iter()}
    cmd = up_command(store, ports, "--exit-when-ready")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rnnserve is up." in out.stdout
    assert f"127.0.0.1:{ports[0]}" in out.stdout
    assert f"client --address 127.0.0.1:{ports[0]} models" in out.stdout  # the model list
    assert f"http://127.0.0.1:{ports[2]}/predictions/" in out.stdout
    assert f"TorchServe metrics: http://127.0.0.1:{ports[3]}/metrics" in out.stdout
    logs = store / "torchserve" / "logs"
    assert f"TorchServe logs: {logs}" in out.stdout and (logs / "ts_log.log").is_file()
    summary = store / "summary.png"
    assert summary.is_file(), "the quick store has a training summary"
    assert f"training summary: {summary}" in out.stdout
    # the access log is on by default: the smoke call's lines are on stderr
    assert re.search(
        r"grpc /rnnserve\.v1\.RnnServe/Generate model=sine status=OK us=\d+", out.stderr
    )
    assert sorted(p.name for p in (store / "torchserve").glob("*.mar"))  # archives were built
    assert started_since(before, store) == []


def test_a_taken_port_stops_up_before_it_starts_anything(tmp_path: Path) -> None:
    store = tmp_path / "never_created"
    ports = free_ports(len(PORT_FLAGS))
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[2]))
        held.listen()
        out = subprocess.run(
            up_command(store, ports), cwd=ROOT, capture_output=True, text=True, timeout=60
        )
    assert out.returncode == 2
    assert out.stderr.startswith(
        f"rnnserve up: --http-port {ports[2]}: port {ports[2]} is taken by pid {os.getpid()} ("
    ), out.stderr
    assert not store.exists()  # nothing was trained, built or started


@dataclass
class Up:
    proc: subprocess.Popen
    ports: list[int]
    store: Path
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def wait_until_up(self, timeout_s: float = 420.0) -> None:
        deadline = time.monotonic() + timeout_s
        while "rnnserve is up." not in self.stdout:
            assert self.proc.poll() is None, "".join(self.stderr[-40:])
            assert time.monotonic() < deadline, "up did not come up"
            time.sleep(0.5)


def _pump(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@pytest.fixture
def running_up(quick_store: Path, tmp_path: Path) -> Iterator[Up]:
    store = store_copy(quick_store, tmp_path)
    ports = free_ports(len(PORT_FLAGS))
    proc = subprocess.Popen(  # its own process group, as a terminal's foreground job
        up_command(store, ports),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    up = Up(proc, ports, store)
    for stream, lines in ((proc.stdout, up.stdout), (proc.stderr, up.stderr)):
        threading.Thread(target=_pump, args=(stream, lines), daemon=True).start()
    try:
        up.wait_until_up()
        yield up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        leftovers = [
            p
            for p in psutil.process_iter(["cmdline"])
            if str(store) in " ".join(p.info["cmdline"] or [])
        ]
        for p in leftovers:
            p.kill()
        assert leftovers == [], "up left processes behind"


def children_of(up: Up) -> tuple[psutil.Process, psutil.Process]:
    """(the gRPC service, TorchServe's Java frontend) that up started."""
    kids = psutil.Process(up.proc.pid).children()
    serve = next(p for p in kids if "serve" in p.cmdline() and "torchserve" not in p.cmdline())
    java = next(p for p in kids if control.FRONTEND_CLASS in p.cmdline())
    return serve, java


def prediction_ok(up: Up) -> bool:
    url = f"http://127.0.0.1:{up.ports[2]}/predictions/sum_sign_lstm"
    return requests.post(url, json={"inputs": [[0.5], [-0.2]]}, timeout=30).status_code == 200


def test_a_second_up_harms_nothing_and_a_killed_child_stops_the_rest(running_up: Up) -> None:
    up = running_up
    serve, java = children_of(up)
    # the case: a second `make run` with the same ports while the first is up
    again = subprocess.run(
        up_command(up.store, up.ports), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2
    assert again.stderr.startswith(
        f"rnnserve up: --grpc-port {up.ports[0]}: port {up.ports[0]} is taken by pid {serve.pid} ("
    ), again.stderr
    # ... and with free ports but the same store: its TorchServe is the first one's
    other = subprocess.run(
        up_command(up.store, free_ports(len(PORT_FLAGS))),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert other.returncode == 2 and f"(pid {java.pid}) already serves" in other.stderr
    assert java.is_running() and prediction_ok(up)
    assert check(f"127.0.0.1:{up.ports[0]}") == "SERVING"

    workers = java.children(recursive=True)
    serve.send_signal(signal.SIGKILL)
    assert up.proc.wait(30) == 1  # noticed at once, not when someone next looks
    said = "\n".join(up.stderr)
    assert f"the gRPC service (pid {serve.pid}) was killed by SIGKILL; stopping TorchServe" in said
    _, alive = psutil.wait_procs([java, *workers], timeout=30)
    assert alive == []
    with pytest.raises(requests.ConnectionError):
        prediction_ok(up)


def test_a_killed_torchserve_is_noticed_and_the_grpc_service_stopped(running_up: Up) -> None:
    up = running_up
    serve, java = children_of(up)
    java.send_signal(signal.SIGKILL)
    assert up.proc.wait(60) == 1
    said = "\n".join(up.stderr)
    assert f"TorchServe (pid {java.pid}) was killed by SIGKILL; stopping the gRPC service" in said
    _, alive = psutil.wait_procs([serve], timeout=30)
    assert alive == []
    assert check(f"127.0.0.1:{up.ports[0]}", timeout=2) == "UNAVAILABLE"


def test_ctrl_c_stops_both_and_exits_0(running_up: Up) -> None:
    """A terminal's Ctrl-C signals up's whole process group; up stops its children itself."""
    up = running_up
    serve, java = children_of(up)
    workers = java.children(recursive=True)
    os.killpg(up.proc.pid, signal.SIGINT)
    assert up.proc.wait(120) == 0, "\n".join(up.stderr[-20:])
    _, alive = psutil.wait_procs([serve, java, *workers], timeout=30)
    assert alive == []
    assert not any("was killed" in line or "exited with" in line for line in up.stderr)
