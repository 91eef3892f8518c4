"""The container form: ``rnnserve torchserve start --foreground`` becomes TorchServe's Java process
(same pid, so the container's signals reach Java), and a SIGTERM, as ``docker stop`` sends, ends
it and its workers."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests
from ports import free_ports

from serving.torchserve import control

CLI = [sys.executable, "-m", "serving.cli"]


def wait_ready(management: str, proc: subprocess.Popen, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"TorchServe exited with {proc.returncode}"
        try:
            if control.model_workers(management, "sine")[0]["status"] == "READY":
                return
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.5)
    pytest.fail("TorchServe did not become READY in the foreground")


def test_foreground_execs_java_and_a_sigterm_stops_everything(quick_store: Path, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "sine").symlink_to(quick_store / "sine", target_is_directory=True)
    subprocess.run([*CLI, "archive", "--store", str(store), "--model", "sine"], check=True)
    _run_foreground(store)


def _run_foreground(store: Path) -> None:
    inference, *others = free_ports(4)
    flags = ["--metrics-port", "--grpc-inference-port", "--grpc-management-port"]
    argv = [*CLI, "torchserve", "start", "--foreground", "--store", str(store), "--model", "sine"]
    argv += ["--inference-port", str(inference)]
    argv += [a for pair in zip(flags, map(str, others), strict=True) for a in pair]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = control.run_dir(store)
    try:
        wait_ready(control.default_management(store), proc)
        java = psutil.Process(proc.pid)
        assert control.FRONTEND_CLASS in java.cmdline()  # exec'd: the same pid is now Java
        workers = java.children(recursive=True)
        assert workers, "no worker process"
        reply = requests.post(
            f"http://127.0.0.1:{inference}/predictions/sine",
            json={"inputs": [[0.0], [0.3]], "horizon": 2},
            timeout=30,
        )
        assert reply.status_code == 200 and len(reply.json()["forecast"]) == 2
        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends to the container's process
        assert proc.wait(60) is not None
        _, alive = psutil.wait_procs(workers, timeout=30)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run([*CLI, "torchserve", "stop", "--store", str(store)], capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)
