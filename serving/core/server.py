"""``NativeServer``: the running server, the native core with the Python parts it calls.

Python loads the models (the same ``Engine`` loading, checksums and backends), registers each
with the core as its spec plus its runner (``backend.step``, called once per batch), and keeps
the engine for what the bridge answers (Predict, metadata). The core binds, serves every service
on one port, and stops gracefully: health NOT_SERVING, no new calls, in-flight calls answered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.backends import LoadedModel
from serving.core import load_native
from serving.core.bridge import Bridge
from serving.core.model_control import ModelControl
from serving.engine import Engine
from serving.manifest import Manifest
from serving.metrics import Metrics

if TYPE_CHECKING:
    from serving.server import ServerConfig


def model_spec(m: Manifest, max_steps: int) -> dict[str, Any]:
    """What the core needs of a manifest (the artifact folder stays Python's business)."""
    return {
        "name": m.name,
        "version": m.version,
        "input_kind": m.input.kind,
        "input_name": m.input.name,
        "features": m.input.features or 0,
        "vocab": m.input.vocab or [],
        "max_steps": max_steps,
        "output_kind": m.output.kind,
        "output_size": m.output.size,
        "activation": m.output.activation,
        "labels": m.labels,
        "streamable": m.streamable,
        "states": [
            {"name": s.name, "layers": s.layers, "size": s.size, "init": s.init} for s in m.state
        ],
    }


def _pem(path: Path | str | None) -> str:
    return Path(path).read_text() if path else ""


class NativeServer:
    """The running native data plane; create with ``create_native_server``."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.core = load_native().Core(self._core_config(config))
        for lm in engine.models():
            self._add_to_core(lm)
        self.control = ModelControl(engine, self.core, self._register, config.model_poll_s)
        self.metrics = Metrics(self.core, engine)
        self.port = 0
        self.metrics_port: int | None = None
        self.bridge: Bridge | None = None
        self._stopped = asyncio.Event()

    def _add_to_core(self, lm: LoadedModel) -> None:
        m = lm.manifest
        self.core.add_model(model_spec(m, self.engine.input_limit(m)), lm.backend.step)

    def _register(self, lm: LoadedModel) -> None:
        """A version loaded while serving: the core first (sessions, steps), then the engine."""
        self._add_to_core(lm)
        self.engine.add(lm)

    @staticmethod
    def _core_config(config: ServerConfig) -> dict[str, Any]:
        e = config.engine
        return {
            "address": config.address,
            "max_batch": e.max_batch_size,
            "queue_delay_s": e.max_queue_delay_ms / 1000.0,
            "session_ttl_s": e.session_ttl_s,
            "max_sessions": e.max_sessions,
            "session_store": config.session_store,
            "max_message_bytes": config.max_message_bytes,
            "tls_cert": _pem(config.tls.cert if config.tls else None),
            "tls_key": _pem(config.tls.key if config.tls else None),
            "tls_client_ca": _pem(config.tls.client_ca if config.tls else None),
            "tokens": config.auth_tokens.digests() if config.auth_tokens else None,
            "max_concurrent_rpcs": config.max_concurrent_rpcs,
            "access_log": config.access_log,
            "access_sink": config.access_log_sink,
        }

    def bind(self) -> int:
        """Start serving (the core binds here: a taken address raises RuntimeError)."""
        self.bridge = Bridge(self.engine, self.core, asyncio.get_running_loop(), self.control)
        self.core.set_bridge(self.bridge)
        self.port = self.core.start()
        return self.port

    async def start(self) -> None:
        await self.engine.start()
        self.control.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port, self.config.metrics_address, self.config.tls
            )

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
        await self.control.stop()
        # the core's stop blocks while in-flight calls finish, some of them bridged onto this
        # loop: run it off the loop
        await asyncio.get_running_loop().run_in_executor(None, self.core.stop, grace)
        await self.engine.stop(grace)
        self.metrics.close()
        self._stopped.set()

    async def wait_for_termination(self) -> None:
        await self._stopped.wait()


async def create_native_server(config: ServerConfig) -> tuple[NativeServer, int]:
    engine = Engine(config.engine)
    server = NativeServer(config, engine)
    return server, server.bind()
