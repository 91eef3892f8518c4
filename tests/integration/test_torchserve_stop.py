"""``rnnserve torchserve stop`` after the Java frontend died hard (SIGKILL, OOM killer): the workers
it started must not outlive it, and a new ``start`` for the same store must work. (Workers usually
notice their socket closing and exit by themselves; ``stop`` ends any that did not.)"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import requests
from ports import free_ports

from serving.torchserve import control

CLI = [sys.executable, "-m", "serving.cli"]


def start(store: Path) -> int:
    ports = free_ports(4)
    flags = [
        "--inference-port",
        "--metrics-port",
        "--grpc-inference-port",
        "--grpc-management-port",
    ]
    argv = [*CLI, "torchserve", "start", "--store", str(store), "--model", "elman"]
    argv += [a for pair in zip(flags, map(str, ports), strict=True) for a in pair]
    subprocess.run(argv, check=True, timeout=240, capture_output=True)
    return ports[0]


def test_stop_after_the_frontend_was_killed_leaves_nothing(quick_store: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "elman").symlink_to(quick_store / "elman", target_is_directory=True)
    try:
        start(store)
        java = control.running_frontend(store)
        assert java is not None
        workers = java.children(recursive=True)
        assert workers
        java.send_signal(signal.SIGKILL)
        java.wait(30)
        stopped = subprocess.run(
            [*CLI, "torchserve", "stop", "--store", str(store)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert stopped.returncode == 0, stopped.stderr
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == []
        port = start(store)  # the pid file and run folder of the dead one are no obstacle
        r = requests.post(f"http://127.0.0.1:{port}/predictions/elman", json={"inputs": [0.5, -1]})
        assert r.status_code == 200 and r.json()["label"] in ("negative", "positive")
    finally:
        subprocess.run([*CLI, "torchserve", "stop", "--store", str(store)], capture_output=True)
        shutil.rmtree(control.run_dir(store), ignore_errors=True)
