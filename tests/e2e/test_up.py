"""The main job end to end: `rnnserve up` on a trained store starts both services, proves a real
call through each, prints how to call them, and leaves no process behind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import psutil
from ports import free_ports

ROOT = Path(__file__).resolve().parents[2]


def test_up_serves_grpc_and_http_then_stops_cleanly(quick_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(quick_store, store, ignore=shutil.ignore_patterns("torchserve"))
    grpc_port, metrics, http, mgmt, ts_metrics = free_ports(5)
    before = {p.pid for p in psutil.process_iter()}
    cmd = [
        sys.executable, "-m", "serving.cli", "up", "--store", str(store), "--exit-when-ready",
        "--grpc-port", str(grpc_port), "--metrics-port", str(metrics), "--http-port", str(http),
        "--management-port", str(mgmt), "--ts-metrics-port", str(ts_metrics),
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rnnserve is up." in out.stdout
    assert f"127.0.0.1:{grpc_port}" in out.stdout
    assert f"http://127.0.0.1:{http}/predictions/" in out.stdout
    assert sorted(p.name for p in (store / "torchserve").glob("*.mar"))  # archives were built
    leftovers = [
        p.info
        for p in psutil.process_iter(["pid", "name", "cmdline"])
        if p.pid not in before and str(store) in " ".join(p.info["cmdline"] or [])
    ]
    assert leftovers == []
