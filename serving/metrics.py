"""Prometheus metrics of the server, on their own registry (several servers per process work),
read from the native core's counters at scrape time.

Names: ``rnnserve_requests_total{method,code}``, ``rnnserve_errors_total{method,code}``,
``rnnserve_step_latency_seconds{model}`` (core time of one step, queueing included),
``rnnserve_batch_size{model}`` (sessions per backend call), ``rnnserve_live_sessions{model}``,
``rnnserve_session_evictions_total{model}`` (expired by the idle TTL),
``rnnserve_sessions_closed_total{model}``, ``rnnserve_refused_rpcs_total{method,reason}`` (RPCs
turned away before their handler ran: ``malformed`` bytes, or ``overloaded``), and per loaded
model version ``rnnserve_model_version_ready{model,version}`` (1 ready, 0 unloading) and
``rnnserve_version_live_sessions{model,version}``. The HTTP endpoint
serves ``/metrics`` and nothing else (404).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from serving.engine import Engine
    from serving.security import TlsConfig

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"


class Metrics:
    """The core's counters under the metric names above, and the HTTP endpoint serving them."""

    def __init__(self, core: Any, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CoreCollector(core, engine))
        self._http: ThreadingWSGIServer | None = None
        self._thread: threading.Thread | None = None

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
        versions = self.core.versions()  # (name, version, ready, live sessions): the core's table
        for name in sorted({v[0] for v in versions}):
            live.add_metric([name], self.core.live_sessions(name))
        for name, m in models.items():
            latency.add_metric([name], *_buckets(m["step_latency"]))
            batch.add_metric([name], *_buckets(m["batch_size"]))
            evicted.add_metric([name], m["evicted"])
            closed.add_metric([name], m["closed"])
        yield from (latency, batch, live, evicted, closed)
        yield from _per_version(versions)


def _per_version(versions: list[tuple[str, int, bool, int]]):
    """Which versions are live: ready for new work (1) or unloading (0), and their sessions."""
    ready = GaugeMetricFamily(
        "rnnserve_model_version_ready",
        "1: new sessions and stateless calls may use this version; 0: unloading",
        labels=["model", "version"],
    )
    live = GaugeMetricFamily(
        "rnnserve_version_live_sessions",
        "open sessions of this version held by this process",
        labels=["model", "version"],
    )
    for name, version, is_ready, sessions in versions:
        ready.add_metric([name, str(version)], 1.0 if is_ready else 0.0)
        live.add_metric([name, str(version)], sessions)
    yield from (ready, live)


def _buckets(h: dict[str, Any]) -> tuple[list[tuple[str, float]], float]:
    cumulative, total = [], 0
    for bound, count in zip([*h["bounds"], float("inf")], h["counts"], strict=True):
        total += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
    return cumulative, h["sum"]


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
