"""``rnnserve up``: the main job behind ``make run``.

Checks that every port it will use is free, trains and exports whatever the store lacks, builds the
TorchServe archives, starts the gRPC service and TorchServe on loopback, checks each answers a real
call, prints how to call them, and then watches both: when one dies, it says which and how, and
stops the other (it does not restart it: a crash that repeats should be seen, not hidden). Ctrl-C
or SIGTERM stops both. It only ever stops processes it started itself: the gRPC service by its pid,
TorchServe by the process session it was started in, never by a store-wide ``torchserve stop``.

Every step is one of our own CLI commands run as a child process, the same commands the containers
run, so serving still never imports training.
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
from dataclasses import dataclass
from pathlib import Path

from serving import access_log, ports
from serving.manifest import list_models, summary_path
from serving.torchserve import control

log = logging.getLogger("rnnserve.up")
CLI = [sys.executable, "-m", "serving.cli"]
WATCH_INTERVAL_S = 0.1
SINE_EXAMPLE = "0,0.156,0.309,0.454,0.588,0.707"  # sin(k dt), dt = 0.157: inside sine's range


class Stop(Exception):
    """SIGINT or SIGTERM: stop what we started and exit 0."""


@dataclass
class Child:
    what: str  # "the gRPC service", "TorchServe"
    proc: subprocess.Popen

    def died(self) -> str | None:
        """How it ended ("exited with code 3", "was killed by SIGKILL"), None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="train what is missing, start gRPC + TorchServe, print examples",
        description="Every port is checked before anything starts; defaults in brackets.",
    )
    p.add_argument(
        "--store", type=Path, default=Path("model_store"), help="model store [%(default)s]"
    )
    p.add_argument("--quick", action="store_true", help="quick-train missing models (a demo)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC API [%(default)s]")
    p.add_argument("--metrics-port", type=int, default=9090, help="gRPC metrics [%(default)s]")
    p.add_argument("--http-port", type=int, default=8080, help="TorchServe inference [%(default)s]")
    p.add_argument(
        "--ts-metrics-port", type=int, default=8082, help="TorchServe metrics [%(default)s]"
    )
    p.add_argument(
        "--ts-grpc-port", type=int, default=7070, help="TorchServe's gRPC inference [%(default)s]"
    )
    p.add_argument(
        "--ts-grpc-management-port",
        type=int,
        default=7071,
        help="TorchServe's gRPC management, always on in TorchServe 0.12 [%(default)s]",
    )
    p.add_argument("--no-torchserve", action="store_true", help="start the gRPC service only")
    p.add_argument("--exit-when-ready", action="store_true", help="stop after the checks (CI)")
    access_log.add_flag(p, default=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    store = args.store.resolve()
    with_ts = not args.no_torchserve
    problem = _ports_problem(_ports(args, with_ts))
    if problem is None and with_ts:
        problem = _store_busy(store)
    if problem:
        print(f"rnnserve up: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    children: list[Child] = []
    try:
        _prepare_store(store, args.quick, with_archives=with_ts)
        grpc_addr = f"127.0.0.1:{args.grpc_port}"
        children.append(Child("the gRPC service", _start_grpc(store, grpc_addr, args)))
        _wait_for_grpc(grpc_addr, children[0])
        if with_ts:
            children.append(Child("TorchServe", _start_torchserve(store, args)))
            _wait_for_torchserve(store, children[1])
        _smoke_calls(grpc_addr, args.http_port if with_ts else None)
        _print_examples(store, grpc_addr, args)
        if args.exit_when_ready:
            return 0
        return _watch(children)
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(children)


def _raise_stop(signum: int, _frame: object) -> None:
    raise Stop(signal.Signals(signum).name)


# ---- before anything starts -------------------------------------------------------------------


def _ports(args: argparse.Namespace, with_ts: bool) -> dict[str, int]:
    wanted = {"--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if with_ts:
        wanted |= {
            "--http-port": args.http_port,
            "--ts-metrics-port": args.ts_metrics_port,
            "--ts-grpc-port": args.ts_grpc_port,
            "--ts-grpc-management-port": args.ts_grpc_management_port,
        }
    return wanted


def _ports_problem(wanted: dict[str, int]) -> str | None:
    """The first port that cannot be used, and why (taken by whom, or given twice)."""
    seen: dict[int, str] = {}
    for flag, port in wanted.items():
        if port in seen:
            return f"{flag} {port} is also {seen[port]}; give each service its own port"
        seen[port] = flag
        why = ports.taken("127.0.0.1", port)
        if why:
            return f"{flag} {port}: {why}; stop it or choose another port with {flag}"
    return None


def _store_busy(store: Path) -> str | None:
    frontend = control.running_frontend(store)
    if frontend is None:
        return None
    return (
        f"a TorchServe (pid {frontend.pid}) already serves {store}; stop it with "
        f"`rnnserve torchserve stop --store {store}` or use another --store"
    )


def _prepare_store(store: Path, quick: bool, with_archives: bool) -> None:
    train = [sys.executable, "-m", "training", "train", "--all", "--store", str(store)]
    log.info("training/exporting any model missing from %s", store)
    _check(subprocess.run(train + (["--quick"] if quick else [])).returncode, "train")
    if with_archives:
        _check(subprocess.run([*CLI, "archive", "--store", str(store)]).returncode, "archive")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"rnnserve up: `{what}` failed with exit code {code}")


# ---- starting ---------------------------------------------------------------------------------


def _start_grpc(store: Path, grpc_addr: str, args: argparse.Namespace) -> subprocess.Popen:
    """In a session of its own, like TorchServe: a Ctrl-C reaches only us, and we stop both, so
    an exit of the service is always news (never the same Ctrl-C arriving there first)."""
    log_flag = "--access-log" if args.access_log else "--no-access-log"
    return subprocess.Popen(
        [*CLI, "serve", "--store", str(store), "--address", grpc_addr,
         "--metrics-port", str(args.metrics_port), log_flag],
        start_new_session=True,
    )  # fmt: skip


def _start_torchserve(store: Path, args: argparse.Namespace) -> subprocess.Popen:
    """TorchServe as our own child (``--foreground`` execs Java in place), leading a session of
    its own: we see how it ends, and stopping it ends its workers and nothing else."""
    command = [
        *CLI, "torchserve", "start", "--foreground", "--store", str(store),
        "--inference-port", str(args.http_port),
        "--metrics-port", str(args.ts_metrics_port),
        "--grpc-inference-port", str(args.ts_grpc_port),
        "--grpc-management-port", str(args.ts_grpc_management_port),
    ]  # fmt: skip
    return subprocess.Popen(command, start_new_session=True)


def _wait_for_grpc(addr: str, child: Child, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _raise_if_dead(child)
        if subprocess.run([*CLI, "health", "--address", addr], capture_output=True).returncode == 0:
            _raise_if_dead(child)  # SERVING from our own process, not from whoever else
            log.info("gRPC service SERVING on %s (pid %d)", addr, child.proc.pid)
            return
        time.sleep(0.5)
    raise SystemExit(f"rnnserve up: the gRPC service on {addr} did not become healthy")


def _wait_for_torchserve(store: Path, child: Child, timeout_s: float = 300.0) -> None:
    try:
        control.wait_until_ready(
            control.default_management(store), list_models(store), child.proc, timeout_s
        )
    except SystemExit:
        _raise_if_dead(child)
        raise
    log.info("TorchServe READY (pid %d)", child.proc.pid)


def _raise_if_dead(child: Child) -> None:
    how = child.died()
    if how is not None:
        raise SystemExit(f"rnnserve up: {child.what} (pid {child.proc.pid}) {how}")


def _smoke_calls(grpc_addr: str, http_port: int | None) -> None:
    """One real call per transport before telling anyone to use them."""
    step = [*CLI, "client", "--address", grpc_addr, "forecast", "--model", "sine",
            "--values", SINE_EXAMPLE, "--steps", "3"]  # fmt: skip
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


def _print_examples(store: Path, grpc_addr: str, args: argparse.Namespace) -> None:
    rn = Path(sys.executable).parent / "rnnserve"
    client = f"{rn} client --address {grpc_addr}"
    lines = [
        "",
        "rnnserve is up.",
        f"  gRPC (rnnserve.v1, KServe v2, health, reflection): {grpc_addr}",
        f"  gRPC metrics (Prometheus): http://127.0.0.1:{args.metrics_port}/metrics",
        f"  gRPC access log: {'one line per call, below' if args.access_log else 'off'}",
    ]
    if not args.no_torchserve:
        lines += [
            f"  TorchServe HTTP: http://127.0.0.1:{args.http_port}/predictions/<model>",
            f"  TorchServe metrics: http://127.0.0.1:{args.ts_metrics_port}/metrics",
            f"  TorchServe logs: {control.log_dir(store)}",
        ]
    summary = summary_path(store)  # the training summary, when the store has one
    if summary.is_file():
        lines.append(f"  training summary: {summary}")
    lines += [
        "",
        "Try:",
        f"  {client} models                       # the model list",
        f"  {client} model sine                   # one model's manifest",
        f"  {client} step --model sum_sign_lstm --values 0.5,-0.2,0.9",
        f"  {client} generate --model char --prompt 'The ' --max-tokens 80 --temperature 0.8 "
        "--seed 1",
        f"  {client} forecast --model sine --values {SINE_EXAMPLE} --steps 50 --plot forecast.png",
    ]
    if not args.no_torchserve:
        url = f"http://127.0.0.1:{args.http_port}/predictions"
        lines += [
            f"  curl -s -X POST {url}/sum_sign_lstm -H 'Content-Type: application/json' "
            "-d '{\"inputs\": [[0.5], [-0.2], [0.9]]}'",
            f"  curl -s -X POST {url}/char -H 'Content-Type: application/json' "
            '-d \'{"text": "The ", "generate": 40}\'',
            f"  {rn} torchserve call GET /models --store {store}   # TorchServe's model list",
        ]
    lines += ["", "Ctrl-C stops both services.", ""]
    print("\n".join(lines), flush=True)


# ---- running and stopping ---------------------------------------------------------------------


def _watch(children: list[Child]) -> int:
    """Until a signal (Stop) or a child's death: then say which died and how, and return 1
    (the caller's finally stops the others)."""
    while True:
        for child in children:
            how = child.died()
            if how is not None:
                others = " and ".join(c.what for c in children if c is not child) or "nothing"
                log.error("%s (pid %d) %s; stopping %s", child.what, child.proc.pid, how, others)
                print(f"rnnserve up: {child.what} {how}; stopping the rest", file=sys.stderr)
                return 1
        time.sleep(WATCH_INTERVAL_S)


def _stop(children: list[Child]) -> None:
    """Stop what we started, TorchServe first (its workers live in its session)."""
    for child in reversed(children):
        proc = child.proc
        if child.what == "TorchServe":
            control.stop_session(proc.pid)  # the frontend, then whatever is left in its session
        elif proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # graceful: in-flight steps finish
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if children:
        log.info("stopped")
