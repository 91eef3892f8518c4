"""``NativeServer``: the native data plane behind the life cycle of ``serving.server.RnnServer``.

Python loads the models (the same ``Engine`` loading, checksums and backends), registers each
with the core as its spec plus its runner (``backend.step``, called once per batch), and keeps
the engine for what the bridge answers (Predict, metadata). The core binds, serves every service
on one port, and stops gracefully: health NOT_SERVING, no new calls, in-flight calls answered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from serving import access_log
from serving.core import load_native
from serving.core.bridge import Bridge
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


def _access_log(config: ServerConfig) -> dict[str, Any]:
    """The Python plane's access log is an interceptor; here the core writes the same line, to
    the interceptor's writer when it has one of its own (stderr otherwise)."""
    for interceptor in config.interceptors:
        if isinstance(interceptor, access_log.AccessLog):
            custom = interceptor.write is not access_log._stderr
            return {"access_log": True, "access_sink": interceptor.write if custom else None}
    return {"access_log": False}


class NativeMetrics(Metrics):
    """The core's counters under the Python data plane's metric names, read at scrape time."""

    def __init__(self, core: Any, engine: Engine) -> None:  # no Python-side families to update
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.registry.register(_CoreCollector(core, engine))
        self._http = None
        self._thread = None


class _CoreCollector:
    def __init__(self, core: Any, engine: Engine) -> None:
        self.core, self.engine = core, engine

    def collect(self):
        snap = self.core.metrics()
        requests = CounterMetricFamily("rnnserve_requests", "RPCs by method and status code",
                                       labels=["method", "code"])  # fmt: skip
        failed = CounterMetricFamily("rnnserve_errors", "failed RPCs and StepMany entries",
                                     labels=["method", "code"])  # fmt: skip
        for method, code, n in snap["requests"]:
            requests.add_metric([method, code], n)
            if code != "OK":
                failed.add_metric([method, code], n)
        refused = CounterMetricFamily(
            "rnnserve_refused_rpcs",
            "RPCs refused before their handler ran (malformed bytes, overload)",
            labels=["method", "reason"],
        )
        for method, reason, n in snap["refused"]:
            refused.add_metric([method, reason], n)
        yield requests
        yield failed
        yield refused
        yield from self._per_model(snap["models"])

    def _per_model(self, models: dict[str, Any]):
        latency = HistogramMetricFamily(
            "rnnserve_step_latency_seconds",
            "core time of one step (queue + batch)",
            labels=["model"],
        )
        batch = HistogramMetricFamily("rnnserve_batch_size", "sessions per backend call",
                                      labels=["model"])  # fmt: skip
        live = GaugeMetricFamily("rnnserve_live_sessions", "open sessions", labels=["model"])
        evicted = CounterMetricFamily(
            "rnnserve_session_evictions", "sessions expired by the idle TTL", labels=["model"]
        )
        closed = CounterMetricFamily("rnnserve_sessions_closed", "sessions closed by clients",
                                     labels=["model"])  # fmt: skip
        for name in sorted({m.manifest.name for m in self.engine.models()}):
            live.add_metric([name], self.core.live_sessions(name))
        for name, m in models.items():
            latency.add_metric([name], *_buckets(m["step_latency"]))
            batch.add_metric([name], *_buckets(m["batch_size"]))
            evicted.add_metric([name], m["evicted"])
            closed.add_metric([name], m["closed"])
        yield from (latency, batch, live, evicted, closed)


def _buckets(h: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    cumulative, total = [], 0
    for bound, count in zip([*h["bounds"], float("inf")], h["counts"], strict=True):
        total += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return cumulative, h["sum"]


class NativeServer:
    """The running native data plane; create with ``create_native_server``."""

    def __init__(self, config: ServerConfig, engine: Engine) -> None:
        self.config = config
        self.engine = engine
        self.core = load_native().Core(self._core_config(config))
        for lm in engine.models():
            m = lm.manifest
            self.core.add_model(model_spec(m, engine.input_limit(m)), lm.backend.step)
        self.metrics = NativeMetrics(self.core, engine)
        self.port = 0
        self.metrics_port: int | None = None
        self.bridge: Bridge | None = None
        self._stopped = asyncio.Event()

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
            **_access_log(config),
        }

    def bind(self) -> int:
        """Start serving (the core binds here: a taken address raises RuntimeError)."""
        self.bridge = Bridge(self.engine, self.core, asyncio.get_running_loop())
        self.core.set_bridge(self.bridge)
        self.port = self.core.start()
        return self.port

    async def start(self) -> None:
        await self.engine.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port, self.config.metrics_address, self.config.tls
            )

    async def stop(self, grace_s: float | None = None) -> None:
        if self._stopped.is_set():
            return
        grace = self.config.grace_s if grace_s is None else grace_s
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
