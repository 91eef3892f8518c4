"""``rnnserve up``: the main job behind ``make run``.

Trains and exports whatever the store lacks, builds the TorchServe archives, starts the gRPC service
and TorchServe on loopback, checks each answers a real call, prints how to call them, and stops both
cleanly on Ctrl-C / SIGTERM. Every step is one of our own CLI commands run as a child process, the
same commands the containers run, so serving still never imports training.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("rnnserve.up")
CLI = [sys.executable, "-m", "serving.cli"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="train what is missing, start gRPC + TorchServe, print examples")
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--quick", action="store_true", help="quick-train missing models (a demo)")
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9090)
    p.add_argument("--http-port", type=int, default=8080, help="TorchServe inference port")
    p.add_argument("--management-port", type=int, default=8081)
    p.add_argument("--ts-metrics-port", type=int, default=8082)
    p.add_argument("--no-torchserve", action="store_true", help="start the gRPC service only")
    p.add_argument("--exit-when-ready", action="store_true", help="stop after the checks (CI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = args.store.resolve()
    _prepare_store(store, args.quick, with_archives=not args.no_torchserve)
    grpc_addr = f"127.0.0.1:{args.grpc_port}"
    serve = subprocess.Popen(
        [*CLI, "serve", "--store", str(store), "--address", grpc_addr,
         "--metrics-port", str(args.metrics_port)]
    )  # fmt: skip
    ts_args = _torchserve_args(store, args)
    try:
        _wait_for_grpc(grpc_addr, serve)
        if not args.no_torchserve:
            _check(subprocess.run([*CLI, "torchserve", "start", *ts_args]).returncode, "torchserve")
        _smoke_calls(grpc_addr, None if args.no_torchserve else args.http_port)
        _print_examples(grpc_addr, args)
        if not args.exit_when_ready:
            _block_until_signal()
    finally:
        _stop(serve, None if args.no_torchserve else ts_args)
    return 0


def _prepare_store(store: Path, quick: bool, with_archives: bool) -> None:
    train = [sys.executable, "-m", "training", "train", "--all", "--store", str(store)]
    log.info("training/exporting any model missing from %s", store)
    _check(subprocess.run(train + (["--quick"] if quick else [])).returncode, "train")
    if with_archives:
        _check(subprocess.run([*CLI, "archive", "--store", str(store)]).returncode, "archive")


def _torchserve_args(store: Path, args: argparse.Namespace) -> list[str]:
    return [
        "--store", str(store),
        "--inference-port", str(args.http_port),
        "--management-port", str(args.management_port),
        "--metrics-port", str(args.ts_metrics_port),
    ]  # fmt: skip


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"rnnserve up: `{what}` failed with exit code {code}")


def _wait_for_grpc(addr: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"rnnserve up: the gRPC service exited with code {proc.returncode}")
        if subprocess.run([*CLI, "health", "--address", addr], capture_output=True).returncode == 0:
            log.info("gRPC service SERVING on %s", addr)
            return
        time.sleep(0.5)
    raise SystemExit(f"rnnserve up: the gRPC service on {addr} did not become healthy")


def _smoke_calls(grpc_addr: str, http_port: int | None) -> None:
    """One real call per transport before telling anyone to use them."""
    step = [*CLI, "client", "--address", grpc_addr, "forecast", "--model", "sine",
            "--values", "0.0,0.31,0.59,0.81,0.95", "--steps", "3"]  # fmt: skip
    _check(subprocess.run(step, capture_output=True).returncode, "client forecast")
    if http_port is not None:
        body = json.dumps({"inputs": [[0.5], [-0.2], [0.9]]}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/predictions/sum_sign_lstm",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            json.loads(r.read())


def _print_examples(grpc_addr: str, args: argparse.Namespace) -> None:
    rn = Path(sys.executable).parent / "rnnserve"
    lines = [
        "",
        "rnnserve is up.",
        f"  gRPC (rnnserve.v1, KServe v2, health, reflection): {grpc_addr}",
        f"  Prometheus metrics: http://127.0.0.1:{args.metrics_port}/metrics",
        "",
        "Try:",
        f"  {rn} client --address {grpc_addr} models",
        f"  {rn} client --address {grpc_addr} step --model sum_sign_lstm --values 0.5,-0.2,0.9",
        f"  {rn} client --address {grpc_addr} generate --model char --prompt 'The ' "
        "--max-tokens 80 --temperature 0.8 --seed 1",
        f"  {rn} client --address {grpc_addr} forecast --model sine --values 0,0.31,0.59,0.81 "
        "--steps 50 --plot forecast.png",
    ]
    if not args.no_torchserve:
        lines += [
            f"  curl -s -X POST http://127.0.0.1:{args.http_port}/predictions/sum_sign_lstm "
            "-H 'Content-Type: application/json' -d '{\"inputs\": [[0.5], [-0.2], [0.9]]}'",
            f"  curl -s -X POST http://127.0.0.1:{args.http_port}/predictions/char "
            '-H \'Content-Type: application/json\' -d \'{"text": "The ", "generate": 40}\'',
        ]
    lines += ["", "Ctrl-C stops both services.", ""]
    print("\n".join(lines), flush=True)


def _block_until_signal() -> None:
    stop = {"now": False}

    def _handler(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _handler)
    signal.signal(signal.SIGTERM, _handler)
    while not stop["now"]:
        time.sleep(0.2)


def _stop(serve: subprocess.Popen, ts_args: list[str] | None) -> None:
    if ts_args is not None:
        subprocess.run([*CLI, "torchserve", "stop", *ts_args], capture_output=True)
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)  # graceful: in-flight steps finish
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
    log.info("stopped")
