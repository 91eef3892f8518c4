"""A loopback TCP proxy in front of a real redis-server that lets a test order two commits.

The server under test talks RESP to the proxy exactly as to Redis. The proxy reads each command a
client connection sends and forwards it whole; once armed, it holds the staged-record writes
(a ``SET rnnserve:w:…`` and the compare-and-set that follows it on that connection) of two
commits so that Redis runs them interleaved: the new commit's SET, the late commit's SET, the
new commit's compare-and-set, the late commit's compare-and-set. A commit is told apart by the
step index in its record (bytes 8..24 of a session record, 16 hex digits).

``StallingProxy`` instead lets one commit run and holds back Redis's replies to it past the
server's 2 s command timeout: the write landed, its confirmation is lost.

Each runs in a process of its own: a server in the test's process holds the GIL while it connects.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ports import free_ports

STAGING_PREFIX = b"rnnserve:w:"
SETTLE_S = 0.05  # after a command is forwarded: Redis has run it before the next one arrives
NAMES = ("new SET", "late SET", "new CAS", "late CAS")
HOLD_S = 1.5  # under the server's 2 s Redis timeout: a missed interleaving fails, never hangs
STALL_S = 4.0  # well past the server's 2 s Redis command timeout, even on a busy machine


def read_command(stream: BinaryIO) -> tuple[list[bytes], bytes] | None:
    """One RESP array of bulk strings (as hiredis sends): its words and its bytes; None at EOF."""
    head = stream.readline()
    if not head:
        return None
    raw, words = [head], []
    for _ in range(int(head[1:])):
        size_line = stream.readline()
        word = stream.read(int(size_line[1:]) + 2)
        raw += [size_line, word]
        words.append(word[:-2])
    return words, b"".join(raw)


_SPAWN = multiprocessing.get_context("spawn")


class _ProxyProcess:
    """A proxy process on a free loopback port: ``serve(port, *args, ready)`` sets ``ready`` once
    it listens."""

    def __init__(self, name: str, serve: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.port = free_ports(1)[0]
        self._ready = _SPAWN.Event()
        target_args = (self.port, *args, self._ready)
        self._process = _SPAWN.Process(target=serve, args=target_args, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._process.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"the {self.name} proxy did not start")

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(10)


def _each_connection(port: int, redis_port: int, ready: Any, handle: Callable[..., None]) -> None:
    """Listens on port; each client connection gets its own to Redis, and handle(client, redis)."""
    listener = socket.create_server(("127.0.0.1", port))
    ready.set()
    while True:
        client, _ = listener.accept()
        handle(client, socket.create_connection(("127.0.0.1", redis_port)))


def _forward_replies(
    upstream: socket.socket, client: socket.socket, stall: threading.Event | None = None
) -> None:
    """Redis's replies to the client as they come (held for ``STALL_S`` first once ``stall`` is
    set)."""
    try:
        while data := upstream.recv(65536):
            if stall is not None and stall.is_set():
                time.sleep(STALL_S)  # the server has given up on this connection by now
                stall.clear()
            client.sendall(data)
    except OSError:
        pass


def _in_threads(*work: tuple[Callable[..., None], tuple]) -> None:
    for target, args in work:
        threading.Thread(target=target, args=args, daemon=True).start()


class InterleavingProxy(_ProxyProcess):
    """The test's handle: ``armed`` to start holding, ``late_held`` once the late SET waits."""

    def __init__(self, redis_port: int, late_index: int, new_index: int) -> None:
        self.armed = _SPAWN.Event()
        self.late_held = _SPAWN.Event()
        self._sent = _SPAWN.Array(
            "i", len(NAMES)
        )  # per name: its place in the order forwarded (1..)
        shared = (self.armed, self.late_held, self._sent)
        super().__init__("interleaving", serve, redis_port, late_index, new_index, *shared)

    @property
    def order(self) -> list[str]:
        """The held writes in the order they were forwarded."""
        places = {place: name for name, place in zip(NAMES, self._sent[:], strict=True) if place}
        return [places[p] for p in sorted(places)]


def serve(port: int, redis_port: int, late_index: int, new_index: int, *shared: Any) -> None:
    *events, ready = shared
    proxy = _Proxy(late_index, new_index, *events)
    _each_connection(port, redis_port, ready, proxy.connected)


class _Proxy:
    def __init__(self, late_index: int, new_index: int, *shared: Any) -> None:
        self.late = f"{late_index:016x}".encode()  # the record index the late commit writes
        self.new = f"{new_index:016x}".encode()
        self.armed, self.late_held, self.places = shared
        self.sent = {name: threading.Event() for name in NAMES}

    def connected(self, client: socket.socket, upstream: socket.socket) -> None:
        _in_threads((_forward_replies, (upstream, client)), (self._commands, (client, upstream)))

    def _commands(self, client: socket.socket, upstream: socket.socket) -> None:
        stream = client.makefile("rb")
        cas_of: str | None = None  # the commit whose compare-and-set comes next on this connection
        try:
            while command := read_command(stream):
                words, raw = command
                name = self._held_write(words, cas_of)
                cas_of = name.split()[0] if name and name.endswith("SET") else None
                if name:
                    self._forward_in_turn(name, raw, upstream)
                else:
                    upstream.sendall(raw)
        except OSError:
            pass

    def _held_write(self, words: list[bytes], cas_of: str | None) -> str | None:
        if not self.armed.is_set():
            return None
        if cas_of and words[0].upper() in (b"EVALSHA", b"EVAL"):
            return f"{cas_of} CAS"
        if words[0].upper() == b"SET" and words[1].startswith(STAGING_PREFIX):
            index = words[2][8:24]
            return "late SET" if index == self.late else "new SET" if index == self.new else None
        return None

    def _forward_in_turn(self, name: str, raw: bytes, upstream: socket.socket) -> None:
        after = {"late SET": "new SET", "new CAS": "late SET", "late CAS": "new CAS"}.get(name)
        if name == "late SET":
            self.late_held.set()
        if after:
            self.sent[after].wait(HOLD_S)
            time.sleep(SETTLE_S)
        upstream.sendall(raw)
        self.places[NAMES.index(name)] = sum(1 for place in self.places[:] if place) + 1
        self.sent[name].set()


class StallingProxy(_ProxyProcess):
    """Once ``armed``, the first connection that writes a staged record (a commit) gets no reply
    from Redis for ``STALL_S``, though Redis has run its commands. ``commits_after_stall`` counts
    the commits seen on other connections since (a resend of the stalled one, say)."""

    def __init__(self, redis_port: int) -> None:
        self.armed = _SPAWN.Event()
        self._after = _SPAWN.Value("i", -1)  # -1 until the stall; then commits seen since
        super().__init__("stalling", serve_stalling, redis_port, self.armed, self._after)

    @property
    def commits_after_stall(self) -> int:
        """-1 while nothing was stalled."""
        return self._after.value


def serve_stalling(port: int, redis_port: int, armed: Any, after: Any, ready: Any) -> None:
    def connected(client: socket.socket, upstream: socket.socket) -> None:
        stall = threading.Event()  # this connection's: set when its commit is the one held up
        _in_threads(
            (_forward_replies, (upstream, client, stall)),
            (_watched_commands, (client, upstream, armed, after, stall)),
        )

    _each_connection(port, redis_port, ready, connected)


def _watched_commands(client: socket.socket, upstream: socket.socket, *events: Any) -> None:
    armed, after, stall = events
    stream = client.makefile("rb")
    try:
        while command := read_command(stream):
            words, raw = command
            is_commit = words[0].upper() == b"SET" and words[1].startswith(STAGING_PREFIX)
            if is_commit and armed.is_set():
                armed.clear()
                stall.set()
                after.value = 0
            elif is_commit and after.value >= 0:
                with after.get_lock():  # connections have a thread each
                    after.value += 1
            upstream.sendall(raw)
    except OSError:
        pass
