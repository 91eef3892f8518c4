"""Prometheus metrics for the gRPC server, on their own registry (several servers per process work).

Names: ``rnnserve_requests_total{method,code}``, ``rnnserve_errors_total{method,code}``,
``rnnserve_step_latency_seconds{model}`` (engine time per Step, queueing included; a StepMany
message's steps of one model count as one observation),
``rnnserve_batch_size{model}`` (sessions per backend call), ``rnnserve_live_sessions{model}``,
``rnnserve_session_evictions_total{model}`` (expired by the idle TTL),
``rnnserve_sessions_closed_total{model}`` and ``rnnserve_refused_rpcs_total{method,reason}`` (RPCs
turned away before their handler ran: ``malformed`` bytes, or ``overloaded``; see
serving.rpc_guard). The HTTP endpoint serves ``/metrics`` and nothing else (404).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.security import TlsConfig

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"

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
        self.refused = Counter(
            "rnnserve_refused_rpcs",
            "RPCs refused before their handler ran (malformed bytes, overload)",
            ["method", "reason"],
            registry=r,
        )
        self._children: dict[tuple[int, str], Histogram] = {}
        self._requests: dict[tuple[str, str], Counter] = {}
        self._http: ThreadingWSGIServer | None = None
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

    def on_refused(self, method: str, reason: str) -> None:
        self.refused.labels(method, reason).inc()

    def bind(self, engine: Engine) -> None:
        """Live-session gauges read the engine at scrape time."""
        for name in {m.manifest.name for m in engine.models()}:
            self.live_sessions.labels(name).set_function(
                lambda name=name: engine.live_sessions(name)
            )

    # ---- HTTP endpoint ---------------------------------------------------------------------------
    def serve(self, port: int, address: str = "127.0.0.1", tls: TlsConfig | None = None) -> int:
        """Start the /metrics HTTP endpoint in a thread; returns the bound port (0 = any free).
        With ``tls`` it speaks HTTPS; the handshake runs in the request's thread, so a client
        that connects and stalls holds only its own thread, not the accept loop."""

        class Server(ThreadingWSGIServer):  # a class per call: the address family is per bind
            address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]

            def handle_error(self, request: Any, client_address: Any) -> None:
                # a failed TLS handshake or a dropped scrape: no traceback on stderr per client
                log.debug("metrics: request from %s failed", client_address, exc_info=True)

        app = only_metrics_path(make_wsgi_app(self.registry))
        self._http = make_server(address, port, app, Server, handler_class=_QuietHandler)
        if tls is not None:
            self._http.socket = tls.ssl_context().wrap_socket(
                self._http.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def only_metrics_path(app: Callable) -> Callable:
    """The exposition app answers every path (and /favicon.ico); a scraper asks for /metrics
    only, so everything else is 404 and the endpoint shows nothing it was not built for."""

    def serve(environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: this endpoint serves only {METRICS_PATH}\n".encode()]

    return serve


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        pass
