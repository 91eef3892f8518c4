"""Prometheus metrics for the gRPC server, on their own registry (several servers per process work).

Names: ``rnnserve_requests_total{method,code}``, ``rnnserve_errors_total{method,code}``,
``rnnserve_step_latency_seconds{model}`` (engine time per Step, queueing included; a StepMany
message's steps of one model count as one observation),
``rnnserve_batch_size{model}`` (sessions per backend call), ``rnnserve_live_sessions{model}``,
``rnnserve_session_evictions_total{model}`` (expired by the idle TTL) and
``rnnserve_sessions_closed_total{model}``.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from serving.engine import Engine
    from serving.security import TlsConfig

LATENCY_BUCKETS = (
    *(b * 1e-4 for b in (1, 2, 5)),
    *(b * 1e-3 for b in (1, 2, 5, 10, 20, 50, 100, 200, 500)),
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rnnserve_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "rnnserve_errors", "failed RPCs and StepMany entries", ["method", "code"], registry=r
        )
        self.step_latency = Histogram(
            "rnnserve_step_latency_seconds",
            "engine time of one step call (queueing + batch)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rnnserve_batch_size",
            "sessions per backend call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.live_sessions = Gauge("rnnserve_live_sessions", "open sessions", ["model"], registry=r)
        self.evictions = Counter(
            "rnnserve_session_evictions", "sessions expired by the idle TTL", ["model"], registry=r
        )
        self.closed = Counter(
            "rnnserve_sessions_closed", "sessions closed by clients", ["model"], registry=r
        )
        self._children: dict[tuple[int, str], Histogram] = {}
        self._requests: dict[tuple[str, str], Counter] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    # ---- engine hooks (EngineObserver) -----------------------------------------------------------
    def on_batch(self, model: str, size: int) -> None:
        self._child(self.batch_size, model).observe(size)

    def on_step(self, model: str, seconds: float) -> None:
        self._child(self.step_latency, model).observe(seconds)

    def _child(self, histogram: Histogram, model: str) -> Histogram:
        """``histogram.labels(model)``, cached: labels() costs as much as observe() per step."""
        key = (id(histogram), model)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = histogram.labels(model)
        return child

    def on_eviction(self, model: str, reason: str) -> None:
        (self.evictions if reason == "expired" else self.closed).labels(model).inc()

    # ---- transport hooks -------------------------------------------------------------------------
    def on_request(self, method: str, code: str) -> None:
        counter = self._requests.get((method, code))
        if counter is None:  # labels() costs more than inc(): one child per (method, code)
            counter = self._requests[method, code] = self.requests.labels(method, code)
        counter.inc()
        if code != "OK":
            self.errors.labels(method, code).inc()

    def bind(self, engine: Engine) -> None:
        """Live-session gauges read the engine at scrape time."""
        for name in {m.manifest.name for m in engine.models()}:
            self.live_sessions.labels(name).set_function(
                lambda name=name: engine.live_sessions(name)
            )

    # ---- HTTP endpoint ---------------------------------------------------------------------------
    def serve(self, port: int, address: str = "127.0.0.1", tls: TlsConfig | None = None) -> int:
        """Start the /metrics HTTP endpoint in a thread; returns the bound port (0 = any free).
        With ``tls`` it speaks HTTPS (and with its client CA, asks for client certificates)."""
        files: dict[str, object] = {}
        if tls is not None:
            files = {"certfile": str(tls.cert), "keyfile": str(tls.key)}
            if tls.client_ca is not None:
                files.update(client_cafile=str(tls.client_ca), client_auth_required=True)
        self._http, self._thread = start_http_server(port, address, registry=self.registry, **files)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
