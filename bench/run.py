"""The gRPC benchmark, in one run: our server vs the echo floor vs the in-process ORT ceiling.

    python -m bench.run                 # the full run (`make bench`), about 6-8 minutes
    python -m bench.run --quick         # a smoke run: 1 and 16 sessions, short windows

What it does, in this order:
1. finds a model store with seq_lstm and sine (``--store``; else the tests' quick store when it is
   complete; else it trains ``--quick seq_lstm sine`` into .cache/bench_store);
2. starts three server processes on loopback: ``rnnserve serve`` (the real CLI, ONNX Runtime,
   1 intra-op thread, metrics on a free port), ``bench.echo_server`` (same messages, no model) and
   ``bench.echo_server --model ...`` (echo+model: the echo paying the real step-graph call,
   batched per loop turn, no session handling; ``--no-echo-model`` leaves it out);
3. starts ``--workers`` client processes (``bench.load``); for each model, path (unary Step, bidi
   Session stream, StepMany with ``--per-message`` sessions per message, and the same in StepMany's
   packed form: one PackedSteps block per message) and session count, opens
   the sessions on every server, then runs ``--reps`` timed windows (``--warmup`` s not counted,
   ``--duration`` s counted), one per server in turn (the order reversed every other rep), and
   keeps the median of each metric;
4. measures the ORT ceiling in this process (``bench.ceiling``) and idle-session memory in a fresh
   process (``bench.idle_sessions``);
5. writes docs/bench_results.json, the plot docs/bench_steps.png and the generated section of
   docs/benchmarks.md (``bench.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime

from bench import ceiling, report
from bench.echo_server import MAX_BATCH_ROWS
from bench.load import FEATURES, GROUPED, Workers

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("seq_lstm", "sine")
PATHS = ("unary", "stream", "stepmany", "packed")
SESSIONS = (1, 16, 64, 256, 1000)
LISTENING = re.compile(r"on (127\.0\.0\.1:\d+)(?:, metrics on (127\.0\.0\.1:\d+))?")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str  # "rnnserve", "echo" or "echo+model"
    proc: subprocess.Popen
    address: str
    metrics: str | None = None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        return process_cpu_seconds(self.proc.pid)

    def batch_totals(self, model: str) -> tuple[float, float]:
        """(sum, count) of the server's batch-size histogram for ``model`` (0, 0 without)."""
        if not self.metrics:
            return 0.0, 0.0
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=5).read().decode()
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(f'rnnserve_batch_size_sum{{model="{model}"}}'):
                total = float(line.split()[-1])
            elif line.startswith(f'rnnserve_batch_size_count{{model="{model}"}}'):
                count = float(line.split()[-1])
        return total, count

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_times() -> list[int]:
    """The machine's jiffies: user nice system idle iowait irq softirq steal (from /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the vCPUs' time the hypervisor gave to someone else between two cpu_times()."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return delta[7] / max(1, sum(delta))


def cores_busy_between(server: Server, start: float, end: float) -> float:
    """Cores the server kept busy from wall-clock ``start`` to ``end`` (both still to come), read
    at those moments: the CPU that matches the messages counted in that window, without the
    warm-up. Divided by the interval actually slept, in case a read comes late on a busy machine."""
    cpu_first, t_first = cpu_seconds_at(server, start)
    cpu_last, t_last = cpu_seconds_at(server, end)
    return (cpu_last - cpu_first) / max(t_last - t_first, 1e-9)


def cpu_seconds_at(server: Server, when: float) -> tuple[float, float]:
    """(server CPU seconds, wall-clock time of the read), read once ``when`` has come."""
    time.sleep(max(0.0, when - time.time()))
    return server.cpu_seconds(), time.time()


def start_server(name: str, argv: list[str], timeout: float = 60.0) -> Server:
    proc = subprocess.Popen(
        [sys.executable, *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # the first line says where it listens
            found = LISTENING.search(line)
            if found:
                server = Server(name, proc, found.group(1), found.group(2))
                wait_ready(server.address, deadline)
                return server
            if time.monotonic() > deadline:
                break
    except BaseException:  # not ready in time, or interrupted: leave no process behind
        proc.kill()
        proc.wait()
        raise
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name} did not start: {' '.join(argv)}")


def wait_ready(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))


def server_commands(store: Path, echo_model_for: list[str]) -> dict[str, list[str]]:
    """Each server's argv, in the order their windows run; echo+model only for ``echo_model_for``
    (the models benched) and not at all when that is empty."""
    echo = ["-m", "bench.echo_server", "--store", str(store), "--address", "127.0.0.1:0"]
    commands = {"echo": echo}
    if echo_model_for:
        commands["echo+model"] = [*echo, "--model", *echo_model_for]
    commands["rnnserve"] = [
        "-m", "serving.cli", "serve", "--store", str(store), "--address", "127.0.0.1:0",
        "--metrics-port", "0", "--threads", "1",
        "--max-batch", str(MAX_BATCH_ROWS),  # echo+model's cap too (not $RNNSERVE_MAX_BATCH)
    ]  # fmt: skip
    return commands


def echo_model_for(args: argparse.Namespace) -> list[str]:
    """The models echo+model runs the step graph of: the ones benched, unless left out."""
    return [] if args.no_echo_model else list(args.models)


def start_servers(store: Path, echo_model_for: list[str]) -> dict[str, Server]:
    """Starts them all, or none: one failing to start stops those already running."""
    servers: dict[str, Server] = {}
    try:
        for name, argv in server_commands(store, echo_model_for).items():
            servers[name] = start_server(name, argv)
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


# ---- one cell: (model, path, sessions) on every server ----------------------------------------


def split_sessions(n: int, path: str, per_message: int, workers: int) -> list[int]:
    """Sessions per worker; StepMany keeps whole messages (groups) on one worker."""
    if path in GROUPED:
        groups = [min(per_message, n - i) for i in range(0, n, per_message)]
        counts = [0] * workers
        for g, size in enumerate(groups):
            counts[g * workers // len(groups)] += size
        return counts
    base, extra = divmod(n, workers)
    return [base + (1 if w < extra else 0) for w in range(workers)]


def run_cell(
    workers: Workers, servers: dict[str, Server], model: str, path: str, n: int, args
) -> dict[str, Any]:
    counts = split_sessions(n, path, args.per_message, min(len(workers), n))
    counts += [0] * (len(workers) - len(counts))
    for s in servers.values():
        workers.call(
            [("open", {"target": s.address, "model": model, "count": c}) if c else None
             for c in counts]
        )  # fmt: skip
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    order = list(servers)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            samples[name].append(run_window(workers, servers[name], model, path, counts, args))
    for s in servers.values():
        workers.call(
            [("close", {"target": s.address, "model": model}) if c else None for c in counts]
        )
    per_message = min(args.per_message, n) if path in GROUPED else 1
    cell: dict[str, Any] = {
        "model": model,
        "path": path,
        "sessions": n,
        "per_message": per_message,
        "client_processes": sum(1 for c in counts if c),
    }
    for name, reps in samples.items():
        cell[name] = summarize(reps)
        cell[name]["reps"] = reps
    return cell


def summarize(reps: list[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over the windows; a None (a per-message cost in a window without
    messages) is left out, and a metric no window has stays None."""
    medians: dict[str, float | None] = {}
    for key in reps[0]:
        values = [r[key] for r in reps if r[key] is not None]
        medians[key] = statistics.median(values) if values else None
    return medians


def run_window(
    workers: Workers, server: Server, model: str, path: str, counts: list[int], args
) -> dict[str, float | None]:
    batch_before = server.batch_totals(model)
    cpu_before = server.cpu_seconds()
    clients_before = sum(process_cpu_seconds(p.pid) for p in workers.procs)
    machine_before = cpu_times()
    window = {"start_at": time.time() + 0.1, "warmup": args.warmup, "duration": args.duration}
    command = {
        "target": server.address,
        "model": model,
        "path": path,
        "per_message": args.per_message,
        "window": window,
    }
    counted_from = window["start_at"] + args.warmup
    counted_to = counted_from + args.duration
    with ThreadPoolExecutor(1) as clock:  # reads the server's CPU while the workers run
        counted = clock.submit(cores_busy_between, server, counted_from, counted_to)
        answers = workers.call([("run", command) if c else None for c in counts])
        cores_counted = counted.result()
    cpu = server.cpu_seconds() - cpu_before
    clients = sum(process_cpu_seconds(p.pid) for p in workers.procs) - clients_before
    steal = steal_share(machine_before, cpu_times())
    batch_after = server.batch_totals(model)
    latencies = np.concatenate([np.asarray(a["latencies"]) for a in answers])
    steps = sum(a["steps"] for a in answers)
    batches = batch_after[1] - batch_before[1]
    elapsed = 0.1 + args.warmup + args.duration  # the server's CPU is read around all of it
    rates = {"steps_per_s": steps / args.duration, "msgs_per_s": len(latencies) / args.duration}
    return {
        **rates,
        "p50_us": float(np.percentile(latencies, 50)) * 1e6 if len(latencies) else float("nan"),
        "p99_us": float(np.percentile(latencies, 99)) * 1e6 if len(latencies) else float("nan"),
        "server_cpu": cpu / elapsed,  # cores busy, roughly (includes the warm-up)
        "server_cpu_counted": cores_counted,  # cores busy while the messages were counted
        **report.cpu_per_message(cores_counted, **rates),  # µs of that CPU per message / step
        "client_cpu": clients / elapsed,  # all client processes together
        "steal": steal,  # share of CPU time the hypervisor took away during the window
        "mean_batch": (batch_after[0] - batch_before[0]) / batches if batches else 0.0,
    }


# ---- the whole run ----------------------------------------------------------------------------


def find_store(given: Path | None) -> Path:
    if given is not None:
        return given
    sys.path.insert(0, str(ROOT))
    from tests.conftest import CACHE, COMPLETE, training_code_hash

    quick = CACHE / training_code_hash()
    if (quick / COMPLETE).is_file():
        return quick
    store = ROOT / ".cache" / "bench_store"
    if not all((store / m).is_dir() for m in MODELS):
        print(f"bench: training {' '.join(MODELS)} (--quick) into {store}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "training", "train", "--quick", *MODELS, "--store", str(store),
             "--no-progress"],
            cwd=ROOT, check=True,
        )  # fmt: skip
    return store


def wait_for_quiet(max_wait_s: float, threshold: float = 1.0) -> dict[str, Any]:
    """Wait (30 s at a time) until the 1-minute load average is below ``threshold``."""
    started = time.monotonic()
    while (load := os.getloadavg()[0]) >= threshold and time.monotonic() - started < max_wait_s:
        print(f"bench: load average {load:.2f} >= {threshold}; waiting", flush=True)
        time.sleep(30)
    return {"load_at_start": load, "waited_s": round(time.monotonic() - started)}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "kernel": platform.release(),
    }


def bounded(kind: type[int] | type[float], low: float, strict: bool = False):
    """An argparse ``type`` for a number >= ``low`` (> with ``strict``): a bad flag stops the run
    before any server starts, not with a ZeroDivisionError after minutes of measuring."""

    def parse(text: str) -> int | float:
        value = kind(text)  # a ValueError here reads "invalid int value: 'x'"
        if not (value > low if strict else value >= low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    count, seconds = bounded(int, 1), bounded(float, 0.0)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(FEATURES))
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--sessions", nargs="+", type=count, default=list(SESSIONS))
    p.add_argument("--per-message", type=count, default=64, help="StepMany sessions per message")
    p.add_argument("--workers", type=count, default=2, help="client processes")
    p.add_argument("--reps", type=count, default=3)
    p.add_argument("--warmup", type=seconds, default=0.4, help="seconds per window not counted")
    p.add_argument("--duration", type=bounded(float, 0.0, strict=True), default=1.0,
                   help="seconds per window counted")  # fmt: skip
    p.add_argument("--idle-sessions", type=count, default=100_000)
    p.add_argument("--wait-quiet", type=seconds, default=0.0, help="wait up to this many seconds "
                   "for a 1-minute load average < 1.0 before measuring")  # fmt: skip
    p.add_argument(
        "--no-echo-model",
        action="store_true",
        help="leave out the echo+model "
        "server (the echo paying the step-graph call); a run without it is shorter",
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 16 sessions, 1 rep")
    args = p.parse_args(argv)
    missing = [m for m in args.models if args.store and not (args.store / m).is_dir()]
    if missing:
        p.error(f"--store {args.store} has no {', '.join(missing)}")
    if args.quick:
        args.sessions, args.reps, args.warmup, args.duration = [1, 16], 1, 0.2, 0.5
        args.idle_sessions = 10_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = find_store(args.store)
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else {}
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "quiet": quiet,
        "load_before": os.getloadavg(),
    }
    machine_before = cpu_times()
    results["cells"] = measure_cells(store, args)
    results["ceiling"] = ceiling.measure(store, args.models, tuple(args.sessions))
    results["idle"] = idle_sessions(store, args.idle_sessions)
    results["load_after"] = os.getloadavg()
    results["steal"] = steal_share(machine_before, cpu_times())
    results["seconds"] = round(time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write_all(results, args.out)
    print(report.targets_text(results))
    print(f"bench: done in {results['seconds']} s; wrote {args.out}/benchmarks.md")
    return 0


def measure_cells(store: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (model, path, sessions) cell on every server; the servers and the client processes
    are stopped however it ends (a client process failing to start, an interrupt)."""
    cells = []
    servers = start_servers(store, echo_model_for(args))
    try:
        workers = Workers(args.workers)
        try:
            for model in args.models:
                for path in args.paths:
                    for n in args.sessions:
                        cells.append(run_cell(workers, servers, model, path, n, args))
                        print(report.cell_line(cells[-1]), flush=True)
        finally:
            workers.close()
    finally:
        for s in servers.values():
            s.stop()
    return cells


def idle_sessions(store: Path, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.idle_sessions", "--store", str(store), "--count", str(count)],
        cwd=ROOT, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
