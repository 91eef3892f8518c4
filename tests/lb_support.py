"""Real processes on loopback for scale-out tests: rnnserve replicas and nginx in front of them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_ports

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx" / "grpc.conf.template"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def serving(address: str, timeout: float = 0.5) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


class Replica:
    """``rnnserve serve --session-store URL`` as a child process."""

    def __init__(self, store: Path, redis_url: str, log: Path, *flags: str) -> None:
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.args = [
            sys.executable, "-m", "serving.cli", "serve", "--store", str(store),
            "--address", self.address, "--metrics-port", "-1",
            "--session-store", redis_url, "--no-access-log", *flags,
        ]  # fmt: skip
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ)
            )

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not serving(self.address):
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text()[-600:]
                raise RuntimeError(f"replica {self.address} did not start: {log}")
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


def render(listen: str, upstreams: str, run_dir: Path, error_log: Path | str) -> str:
    """The template with its placeholders filled (nginx's own $variables left alone), as the nginx
    image's envsubst step fills it in compose."""
    return string.Template(TEMPLATE.read_text()).safe_substitute(
        RNNSERVE_LISTEN=listen,
        RNNSERVE_UPSTREAMS=upstreams,
        RNNSERVE_RUN_DIR=str(run_dir),
        RNNSERVE_ERROR_LOG=str(error_log),
    )


def nginx_command(nginx: str, config: Path | str) -> list[str]:
    """How nginx is started, here and in compose's lb service."""
    return [nginx, "-c", str(config)]


class Nginx:
    """nginx from the distribution, its config rendered from deploy/nginx/grpc.conf.template."""

    def __init__(self, folder: Path, upstreams: list[str]) -> None:
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.folder = folder
        self.config = folder / "nginx.conf"
        # max_fails=0: on loopback a stopped replica refuses at once and nginx moves on to the
        # next; counting failures instead took live replicas out too (a kill cuts many streams
        # at once), and for 2 s at a time nginx answered 502 "no live upstreams" to every call
        servers = "\n        ".join(f"server {a} max_fails=0;" for a in upstreams)
        self.config.write_text(render(self.address, servers, folder, folder / "error.log"))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            nginx_command(NGINX, self.config),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = (self.folder / "error.log").read_text(errors="replace")
                    raise RuntimeError(f"nginx did not start: {log}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: lets proxied calls end
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
