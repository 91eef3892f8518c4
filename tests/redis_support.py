"""A real redis-server on a free loopback port, started and stopped (by PID) by the test."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from ports import free_ports

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisProcess:
    """One redis-server; ``stop()`` and ``start()`` again keep its port (and its data with AOF)."""

    def __init__(self, folder: Path, appendonly: bool = False, appendfsync: str = "always") -> None:
        self.folder = folder
        self.port = free_ports(1)[0]
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--dir", str(self.folder), "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.command("PING") != "+PONG":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None

    def command(self, *words: str) -> str:
        """One inline command; the first line of the reply ('' when Redis is not there)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                s.sendall((" ".join(words) + "\r\n").encode())
                return s.recv(65536).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError:
            return ""

    def raw(self, *args: bytes) -> bytes:
        """One command in RESP, binary-safe; the raw reply bytes."""
        out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(out)
            time.sleep(0.05)
            return s.recv(1 << 20)

    def info(self, field: str) -> int:
        """One integer field of INFO memory (``used_memory``, …)."""
        for line in self.raw(b"INFO", b"memory").decode(errors="replace").splitlines():
            if line.startswith(field + ":"):
                return int(line.split(":", 1)[1])
        raise RuntimeError(f"INFO memory has no {field}")
