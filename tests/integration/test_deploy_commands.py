"""The containers' commands, run on this host: what docker-compose.yml runs, for real.

No Docker engine runs here, so each service's exact command line and healthcheck are taken from
docker-compose.yml and run locally. Only what the container provides is swapped: `/models` becomes a
model store here, container-wide binds (0.0.0.0) become 127.0.0.1, fixed ports become free ones, and
the `redis` service becomes a real redis-server on a free loopback port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml
from redis_support import RedisProcess

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
TORCHSERVE_CONFIG = ROOT / "deploy" / "torchserve" / "config.properties"
RNNSERVE = Path(sys.executable).with_name("rnnserve")  # the console script the image runs
CONTAINER_STORE = "/models"
DEFAULT = re.compile(r"\$\{\w+:-([^}]*)\}")  # test_deploy.py checks every variable has one


def compose_service(name: str) -> dict:
    """A service with every variable at its default."""
    text = DEFAULT.sub(lambda m: m.group(1), COMPOSE_FILE.read_text())
    return yaml.safe_load(text)["services"][name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localised(command: list[str], swaps: dict[str, str]) -> list[str]:
    """The command with whole arguments swapped, and `rnnserve` as this venv's console script."""
    swapped = [swaps.get(arg, arg) for arg in command]
    return [str(RNNSERVE), *swapped[1:]] if swapped[0] == "rnnserve" else swapped


def wait_until_healthy(check: list[str], server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        if subprocess.run(check, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.5)
    pytest.fail(f"healthcheck {check} never passed in {timeout_s:.0f} s")


def end_session(proc: subprocess.Popen) -> list[str]:
    """Stop a process started in its own session; name whatever in that session outlived it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    members = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                members.append(p)
        except (OSError, psutil.Error):
            continue
    _, alive = psutil.wait_procs(members, timeout=10)  # workers finishing their own shutdown
    leftovers = []
    for p in alive:
        try:
            leftovers.append(" ".join(p.cmdline())[:120])
            p.kill()
        except psutil.Error:
            continue
    return leftovers


@pytest.fixture
def grpc_ports() -> dict[str, int]:
    return {"grpc": free_port(), "metrics": free_port()}


@pytest.fixture
def grpc_service(quick_store: Path, grpc_ports: dict[str, int], tmp_path: Path) -> Iterator:
    spec = compose_service("grpc")
    swaps = {
        CONTAINER_STORE: str(quick_store),
        "0.0.0.0:50051": f"127.0.0.1:{grpc_ports['grpc']}",
        "9090": str(grpc_ports["metrics"]),
        "0.0.0.0": "127.0.0.1",
    }
    redis = RedisProcess(tmp_path)
    redis.start()
    environment = {k: str(v) for k, v in spec["environment"].items()}
    environment = {k: v.replace("redis://redis:6379", redis.url) for k, v in environment.items()}
    env = {**os.environ, **environment}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        localised(spec["command"], swaps),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    healthcheck = localised(
        spec["healthcheck"]["test"][1:], {"127.0.0.1:50051": swaps["0.0.0.0:50051"]}
    )
    try:
        yield server, healthcheck
    finally:
        leftovers = end_session(server)
        redis.stop()
        log.close()
        assert leftovers == []


def test_grpc_healthcheck_fails_when_nothing_serves(grpc_ports: dict[str, int]) -> None:
    check = compose_service("grpc")["healthcheck"]["test"][1:]
    address = f"127.0.0.1:{grpc_ports['grpc']}"
    result = subprocess.run(localised(check, {"127.0.0.1:50051": address}), capture_output=True)
    assert result.returncode != 0


def test_grpc_service_command_serves_passes_healthcheck_and_stops_cleanly(
    grpc_service, grpc_ports: dict[str, int]
) -> None:
    server, healthcheck = grpc_service
    wait_until_healthy(healthcheck, server, timeout_s=120)

    # The README's host-side calls: our client CLI and the metrics endpoint.
    address = f"127.0.0.1:{grpc_ports['grpc']}"
    models = subprocess.run(
        [str(RNNSERVE), "client", "--address", address, "models"], capture_output=True, text=True
    )
    assert models.returncode == 0, models.stderr
    assert "sum_sign_lstm" in models.stdout
    url = f"http://127.0.0.1:{grpc_ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200 and b"# TYPE" in reply.read()

    # `docker compose stop` sends SIGTERM and waits stop_grace_period; the server must finish first.
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=30) == 0


def torchserve_config_for_this_host(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """deploy/torchserve/config.properties with loopback binds and free ports."""
    ports = {key: free_port() for key in ("inference", "management", "metrics", "grpc", "grpc_m")}
    text = TORCHSERVE_CONFIG.read_text()
    for key in ("inference", "management", "metrics"):
        text = re.sub(
            rf"^{key}_address=.*$", f"{key}_address=http://127.0.0.1:{ports[key]}", text, flags=re.M
        )
    text += f"grpc_inference_port={ports['grpc']}\ngrpc_management_port={ports['grpc_m']}\n"
    config = tmp_path / "torchserve.properties"
    config.write_text(text)
    return config, ports


def test_archive_and_torchserve_commands_serve_and_pass_the_ping_healthcheck(
    quick_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "models"  # a copy: the archive job writes into its store
    shutil.copytree(quick_store, store)
    archive = localised(compose_service("archive")["command"], {CONTAINER_STORE: str(store)})
    result = subprocess.run(archive, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert (store / "torchserve" / "sum_sign_lstm.mar").is_file()

    spec = compose_service("torchserve")
    config, ports = torchserve_config_for_this_host(tmp_path)
    container_config = spec["command"][spec["command"].index("--config") + 1]
    swaps = {CONTAINER_STORE: str(store), container_config: str(config)}
    # One model keeps the suite quick; the torchserve tests load every model.
    command = [*localised(spec["command"], swaps), "--model", "sum_sign_lstm"]
    healthcheck = [
        arg.replace("127.0.0.1:8080", f"127.0.0.1:{ports['inference']}")
        for arg in localised(spec["healthcheck"]["test"][1:], {"python": sys.executable})
    ]
    log = (tmp_path / "torchserve.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(healthcheck, server, timeout_s=180)
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports['inference']}/predictions/sum_sign_lstm",
            data=b'{"inputs": [[0.5], [-0.2], [0.9]]}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200
    finally:
        assert end_session(server) == []
        log.close()
