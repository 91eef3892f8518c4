"""The gRPC server's configuration, its life cycle for embedding and tests, and ``rnnserve serve``.

``await create_server(config)`` → ``(server, port)``: the seam tests and ``rnnserve serve`` use. It
loads every model (refusing corrupt artifacts), hands them to the native core, which binds the
port (``127.0.0.1:0`` = any free port) and serves our API, the OIP, health and reflection on it;
``await server.start()`` starts serving, ``await server.stop(grace)`` stops gracefully (health →
NOT_SERVING, no new RPCs, in-flight ones answered, then the models stop). ``ServerThread`` runs a
server on its own event loop in a background thread, for synchronous callers and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import access_log, ports
from serving.backends import BACKENDS
from serving.core.server import NativeServer, create_native_server
from serving.engine import Engine, EngineConfig
from serving.errors import ArtifactError
from serving.security import TlsConfig, TokenTable

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_METRICS_PORT = 9090


@dataclass(frozen=True)
class ServerConfig:
    engine: EngineConfig
    address: str = DEFAULT_ADDRESS
    metrics_port: int | None = DEFAULT_METRICS_PORT  # None: no metrics endpoint; 0: any free port
    metrics_address: str = "127.0.0.1"
    max_message_bytes: int = 4 * 1024 * 1024  # larger messages fail with RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 10_000  # RPCs in flight; past it RESOURCE_EXHAUSTED
    grace_s: float = 10.0  # how long stop() lets in-flight RPCs finish
    tls: TlsConfig | None = None  # TLS on the gRPC port and the metrics endpoint
    auth_tokens: TokenTable | None = None  # bearer tokens every RPC but health must carry
    access_log: bool = False  # one line per call (serving.access_log)
    access_log_sink: Callable[[str], None] | None = None  # where the lines go; None: stderr
    # where sessions live: "memory" (this process) or "redis://HOST:PORT[/DB]" (shared by replicas)
    session_store: str = field(
        default_factory=lambda: os.environ.get("RNNSERVE_SESSION_STORE", "memory")
    )
    model_poll_s: float = 0.0  # rescan the store for new / removed versions this often; 0 = off

    def __post_init__(self) -> None:
        check_session_store(self.session_store)
        if not self.model_poll_s >= 0:
            raise ValueError(f"model_poll_s must be >= 0, got {self.model_poll_s}")


def check_session_store(store: str) -> None:
    """ValueError naming the accepted forms when the store is neither."""
    if store != "memory" and not store.startswith("redis://"):
        raise ValueError(f"session store must be 'memory' or redis://HOST:PORT[/DB], got {store!r}")


async def create_server(config: ServerConfig) -> tuple[NativeServer, int]:
    """Load models and bind; returns the server (not started) and its bound port.

    Must be awaited inside the event loop that will run the server. Raises ArtifactError on a
    corrupt store and RuntimeError when the address cannot be bound or the session store cannot
    be reached.
    """
    return await create_native_server(config)


class ServerThread:
    """A server on its own loop in a daemon thread: ``with ServerThread(cfg) as s: s.address``."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: NativeServer | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="rnnserve-server", daemon=True)

    @property
    def address(self) -> str:
        host = self.config.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def engine(self) -> Engine:
        assert self.server is not None
        return self.server.engine

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the server's loop (e.g. to inspect or stop it) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float | None = None) -> None:
        if self.server is not None and self._thread.is_alive():
            self.call(self.server.stop(grace_s), timeout=(grace_s or self.config.grace_s) + 30)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        try:
            self.server, self.port = await create_server(self.config)
            await self.server.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        await self.server.wait_for_termination()


# ---- `rnnserve serve` -------------------------------------------------------------------------


# (flag, environment variable, type, default, help); the environment overrides the default and a
# flag overrides both, so containers configure through the environment and people through flags.
SERVE_OPTIONS: list[tuple[str, str, Callable[[str], Any], Any, str]] = [
    ("--store", "RNNSERVE_STORE", Path, "model_store", "model store folder"),
    ("--address", "RNNSERVE_ADDRESS", str, DEFAULT_ADDRESS, "host:port to listen on"),
    ("--metrics-port", "RNNSERVE_METRICS_PORT", int, DEFAULT_METRICS_PORT,
     "Prometheus /metrics port (0 = any free port, -1 = off)"),
    ("--metrics-address", "RNNSERVE_METRICS_ADDRESS", str, "127.0.0.1", "metrics bind address"),
    ("--backend", "RNNSERVE_BACKEND", str, "onnx", f"inference backend: {' or '.join(BACKENDS)}"),
    ("--threads", "RNNSERVE_THREADS", int, 1, "intra-op threads per backend call"),
    ("--session-ttl", "RNNSERVE_SESSION_TTL", float, 600.0, "idle seconds before expiry"),
    ("--max-sessions", "RNNSERVE_MAX_SESSIONS", int, 100_000, "open sessions over all models"),
    ("--session-store", "RNNSERVE_SESSION_STORE", str, "memory",
     "where sessions live: memory, or redis://HOST:PORT[/DB] shared by replicas"),
    ("--max-batch", "RNNSERVE_MAX_BATCH", int, 256, "sessions per backend call"),
    ("--max-queue-delay-ms", "RNNSERVE_MAX_QUEUE_DELAY_MS", float, 0.0,
     "wait up to this long for a fuller batch (0 = never wait)"),
    ("--grace", "RNNSERVE_GRACE_S", float, 10.0, "seconds in-flight RPCs get on SIGTERM"),
    ("--model-poll-s", "RNNSERVE_MODEL_POLL_S", float, 0.0,
     "rescan the store this often: load new versions, unload removed ones (0 = off)"),
    ("--max-concurrent-rpcs", "RNNSERVE_MAX_CONCURRENT_RPCS", int, 10_000,
     "RPCs in flight before new ones get RESOURCE_EXHAUSTED (health checks exempt)"),
    ("--tls-cert", "RNNSERVE_TLS_CERT", str, "", "PEM certificate chain: TLS on gRPC and metrics"),
    ("--tls-key", "RNNSERVE_TLS_KEY", str, "", "PEM private key of --tls-cert"),
    ("--tls-client-ca", "RNNSERVE_TLS_CLIENT_CA", str, "",
     "PEM CA bundle: clients must present a certificate it signed (mutual TLS)"),
    ("--auth-token-file", "RNNSERVE_AUTH_TOKEN_FILE", str, "",
     "file of 'identity:token' lines: every RPC but health needs 'authorization: Bearer <token>'"),
]  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve every model in the store over gRPC (our API + OIP), with health and metrics",
        description="Each flag defaults to its environment variable, shown as [VAR, default].",
    )
    for flag, env, kind, default, text in SERVE_OPTIONS:
        p.add_argument(
            flag,
            type=_from_flag_or(env, kind),
            # argparse converts a string default with ``type`` only when `serve` is parsed, so a
            # bad value in the environment is a usage error of `serve`, not a traceback of every
            # command that builds this parser (``rnnserve --help`` builds them all)
            default=os.environ.get(env, default),
            help=f"{text} [{env}, {default}]",
        )
    access_log.add_flag(p)
    p.set_defaults(func=serve_command)


def _from_flag_or(env: str, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """``kind`` whose error names the environment variable the value may have come from."""

    def convert(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {kind.__name__} value {text!r} (from the flag or ${env})"
            ) from None

    convert.__name__ = kind.__name__
    return convert


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    engine = EngineConfig(
        store=args.store,
        backend=args.backend,
        threads=args.threads,
        session_ttl_s=args.session_ttl,
        max_sessions=args.max_sessions,
        max_batch_size=args.max_batch,
        max_queue_delay_ms=args.max_queue_delay_ms,
    )
    return ServerConfig(
        engine=engine,
        address=args.address,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_address=args.metrics_address,
        grace_s=args.grace,
        max_concurrent_rpcs=args.max_concurrent_rpcs,
        tls=TlsConfig.from_flags(args.tls_cert, args.tls_key, args.tls_client_ca),
        auth_tokens=TokenTable.from_file(Path(args.auth_token_file))
        if args.auth_token_file
        else None,
        session_store=args.session_store,
        access_log=args.access_log,
        model_poll_s=args.model_poll_s,
    )


# EngineConfig's field names in its errors → the flag (and variable) the user set
FLAG_OF_FIELD = {
    "backend for *": "--backend",
    "threads": "--threads",
    "session_ttl_s": "--session-ttl",
    "max_sessions": "--max-sessions",
    "max_batch_size": "--max-batch",
    "max_queue_delay_ms": "--max-queue-delay-ms",
    "model_poll_s": "--model-poll-s",
}


def _in_flag_terms(message: str) -> str:
    env_of = {flag: env for flag, env, *_ in SERVE_OPTIONS}
    for name, flag in FLAG_OF_FIELD.items():
        if message.startswith(f"{name} "):
            return f"{flag}{message[len(name) :]} (from the flag or ${env_of[flag]})"
    return message


def _preflight(config: ServerConfig) -> str | None:
    """Why the gRPC or metrics address cannot be listened on, checked before any model loads."""
    try:
        host, port = ports.split_address(config.address)
    except ValueError as e:
        return f"--address: {e}"
    problem = ports.taken(host, port)
    where = f"--address {config.address}"
    if problem is None and config.metrics_port:
        problem = ports.taken(config.metrics_address, config.metrics_port)
        where = f"--metrics-port {config.metrics_port}"
    return f"{where}: {problem}" if problem else None


def serve_command(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"rnnserve serve: {_in_flag_terms(str(e))}", file=sys.stderr)
        return 2
    problem = _preflight(config)  # before create_server loads every model
    if problem:
        print(f"rnnserve serve: {problem}", file=sys.stderr)
        return 4
    try:
        return asyncio.run(_serve_until_signal(config))
    except ArtifactError as e:
        print(f"rnnserve serve: refusing to start: {e}", file=sys.stderr)
        return 3
    except RuntimeError as e:
        print(f"rnnserve serve: {e}", file=sys.stderr)
        return 4


async def _serve_until_signal(config: ServerConfig) -> int:
    server, port = await create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    host = config.address.rsplit(":", 1)[0]
    metrics = f", metrics on {config.metrics_address}:{server.metrics_port}/metrics"
    names = sorted({m.key for m in server.engine.models()})
    print(
        f"rnnserve: serving {len(names)} model versions ({', '.join(names)}) on {host}:{port}"
        + (metrics if server.metrics_port is not None else ""),
        flush=True,
    )
    await server.wait_for_termination()
    print("rnnserve: stopped", flush=True)
    return 0
