"""The gRPC benchmark, in one run: the native core, the C++ echo floor and the in-process ORT
ceiling, side by side, with C++ clients only.

    python -m bench.run                 # the full run (`make bench`), about 7-10 minutes
    python -m bench.run --quick         # a smoke run: 1 and 64 sessions, one window each, ~2 min

What it does, in this order:
1. finds a model store with seq_lstm (``--store``; else the tests' quick store when it is
   complete; else it trains ``--quick seq_lstm`` into .cache/bench_store), builds the C++ tools
   (``bench.native_tools``) and fetches perf_analyzer (``bench.perf_analyzer``);
2. starts two server processes on loopback: ``rnnserve serve`` (the native core, ONNX Runtime,
   1 intra-op thread; the core build ``RNNSERVE_NATIVE_LIB`` names, if set, else the package's)
   and the C++ echo server (same messages, canned replies, no model);
3. for each cell (API, path, concurrency) runs ``--reps`` measurements per server, the servers
   taking turns (the order reversed every other rep), and keeps the median of each metric:
   - the OIP with Triton's perf_analyzer: sequences of 50±20 steps of seq_lstm, unary
     (``--async``) and streaming (``--async --streaming``);
   - rnnserve.v1 with the C++ load_client: unary Step, Session streams, and StepMany packed with
     ``--per-message`` sessions per message;
   each measurement also reads the server process's CPU time (psutil, all its threads) over the
   measured span: µs of server CPU per step;
4. measures the ORT ceiling in this process (``bench.ceiling``);
5. writes docs/bench_results.json, the plot docs/bench_steps.png and the generated section of
   docs/benchmarks.md (``bench.report``).

A server that exits during the run is counted (``crashes``) and started again; a measurement
that failed keeps its error in the results instead of a number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime
import psutil

from bench import ceiling, native_tools, perf_analyzer, report

ROOT = Path(__file__).resolve().parents[1]
MODEL = "seq_lstm"
FEATURES = 10
SERVERS = ("native", "echo")  # the order their turns run in
OIP_PATHS = ("unary", "stream")
V1_PATHS = ("unary", "stream", "packed")
CONCURRENCY = (1, 16, 64, 256, 1000)
PACKED_CONCURRENCY = (64, 256, 1000)  # sessions; 64 per message: 1, 4 and 16 streams
SEQUENCE_LENGTH, SEQUENCE_VARIATION = 50, 20  # perf_analyzer: 50 ± 20% steps per sequence
LISTENING = re.compile(r"on (127\.0\.0\.1:\d+)")
SAMPLE_EVERY_S = 0.05
NATIVE_LIB = "RNNSERVE_NATIVE_LIB"


# ---- servers ----------------------------------------------------------------------------------


@dataclass
class Server:
    name: str  # "native" or "echo"
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    address: str = ""
    crashes: list[dict[str, Any]] = field(default_factory=list)
    stderr: Any = None

    def start(self, timeout: float = 120.0) -> None:
        if self.stderr is not None:
            self.stderr.close()
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (read back if it fails to start)
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
            stderr=self.stderr, text=True, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            self.address = read_address(self.proc, self.name)
            wait_ready(self.address, deadline)
        except BaseException as e:  # not ready in time, or interrupted: leave no process behind
            self.stop()
            self.stderr.seek(0)
            tail = self.stderr.read().strip().splitlines()[-3:]
            raise RuntimeError(f"{self.name} did not start: {e}; stderr: {' / '.join(tail)}") from e

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart_if_dead(self, during: str) -> bool:
        """Counts a crash and starts the server again when it exited; True when it had."""
        if self.alive():
            return False
        assert self.proc is not None
        self.crashes.append({"during": during, "returncode": self.proc.returncode})
        print(f"bench: {self.name} exited ({self.proc.returncode}) during {during}; restarting",
              flush=True)  # fmt: skip
        self.start()
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def read_address(proc: subprocess.Popen, name: str) -> str:
    """The address from the server's first lines ("... on 127.0.0.1:PORT ...")."""
    assert proc.stdout is not None
    for line in proc.stdout:
        found = LISTENING.search(line)
        if found:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # drain, never block
            return found.group(1)
    raise RuntimeError(f"{name} exited before it listened (status {proc.wait()})")


def wait_ready(address: str, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=max(1.0, deadline - time.monotonic()))


def serve_command(store: Path) -> list[str]:
    """``rnnserve serve`` as shipped, on free ports."""
    return [
        sys.executable, "-m", "serving.cli", "serve", "--store", str(store),
        "--address", "127.0.0.1:0", "--metrics-port", "0", "--threads", "1",
    ]  # fmt: skip


def server_commands(store: Path, echo_binary: Path, canned: Path) -> dict[str, list[str]]:
    """Each server's argv, in the order their turns run."""
    return {
        "native": serve_command(store),
        "echo": native_tools.echo_command(echo_binary, canned),
    }


def server_env(name: str) -> dict[str, str]:
    """No ``RNNSERVE_`` setting left in the environment changes what is benched, but the native
    server keeps ``RNNSERVE_NATIVE_LIB`` (a core build to measure instead of the package's)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    if name == "native" and os.environ.get(NATIVE_LIB):
        env[NATIVE_LIB] = os.environ[NATIVE_LIB]
    return env


# ---- the server CPU over a measured span -------------------------------------------------------


class CpuSampler:
    """Reads a server's CPU time every 50 ms in a thread; ``cores(a, b)`` is the CPU it used from
    monotonic time a to b (interpolated between samples) divided by b - a."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def _sample(self) -> None:
        with contextlib.suppress(psutil.Error, AssertionError):  # gone: a crash, counted elsewhere
            self.samples.append((time.monotonic(), self.server.cpu_seconds()))

    def cores(self, start: float, end: float) -> float | None:
        return cores_between(self.samples, start, end)


def cores_between(samples: list[tuple[float, float]], start: float, end: float) -> float | None:
    """Cores busy from ``start`` to ``end``, from (time, cpu seconds) samples in time order;
    None when the samples do not cover the span."""
    if len(samples) < 2 or end <= start or start < samples[0][0] or end > samples[-1][0]:
        return None
    times = [t for t, _ in samples]
    cpu = [c for _, c in samples]
    return float(np.interp(end, times, cpu) - np.interp(start, times, cpu)) / (end - start)


def per_step_us(cores: float | None, steps_per_s: float) -> float | None:
    """µs of server CPU per step: 0.5 cores at 5,000 steps/s is 100 µs a step."""
    if cores is None or steps_per_s <= 0:
        return None
    return cores / steps_per_s * 1e6


# ---- one measurement: perf_analyzer on the OIP, or load_client on rnnserve.v1 ------------------


def oip_measurement(server: Server, path: str, n: int, args, binary: Path) -> dict[str, Any]:
    """One perf_analyzer run (three windows of ``--window-ms``). Its windows fill the run but
    for its start and its drain, so the CPU is read over a span as long as its windows, centered
    in the run."""
    command = perf_analyzer.command(
        binary, server.address, MODEL, concurrency=n, streaming=path == "stream",
        sequence_length=SEQUENCE_LENGTH, window_ms=args.window_ms,
        extra=["--sequence-length-variation", str(SEQUENCE_VARIATION),
               *([] if path == "stream" else ["--async"])],
    )  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent.parent / "lib")}
    timeout = 60 + 10 * args.window_ms / 1000
    with CpuSampler(server) as sampler:
        started = time.monotonic()
        tool = run_until_reported(command, env, timeout)
        ended = tool.reported_at or time.monotonic()
    if tool.timed_out:
        return {"error": f"perf_analyzer did not report within {timeout:.0f} s"}
    result = perf_analyzer.parse(tool.returncode, tool.output)
    if not result.ok:
        return {"error": first_error(result), "steps_per_s": result.throughput}
    measured = result.request_count / result.throughput if result.throughput else 0.0
    margin = max(0.0, (ended - started - measured) / 2)
    cores = sampler.cores(started + margin, ended - margin)
    return {
        "steps_per_s": result.throughput,
        "msgs_per_s": result.throughput,
        "p50_us": result.p50_us,
        "p99_us": result.p99_us,
        "server_cores": cores,
        "server_us_per_step": per_step_us(cores, result.throughput),
        **({"note": "perf_analyzer hung after its report; killed"} if tool.hung else {}),
    }


REPORT_END = "Inferences/Second vs. Client"  # perf_analyzer's last lines follow this one
AFTER_REPORT_S = 10.0  # then it only drains and exits; longer is a hang at its end


@dataclass
class ToolRun:
    returncode: int
    output: str
    reported_at: float | None  # monotonic time its report was complete
    hung: bool = False  # reported, then did not exit: killed (the report still counts)
    timed_out: bool = False  # never reported: killed


def run_until_reported(command: list[str], env: dict[str, str], timeout: float) -> ToolRun:
    """Runs perf_analyzer, and kills it when it has not reported within ``timeout`` or has not
    exited ``AFTER_REPORT_S`` after reporting (it can wait at its end for sequences a server never
    finishes answering; the report is complete by then)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    lines: list[str] = []
    reported = threading.Event()
    stamp: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if REPORT_END in line and not reported.is_set():
                stamp.append(time.monotonic())
                reported.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while not reported.is_set() and proc.poll() is None and time.monotonic() < deadline:
        reported.wait(0.1)
    timed_out = not reported.is_set() and proc.poll() is None
    hung = False
    try:
        proc.wait(0 if timed_out else AFTER_REPORT_S)
    except subprocess.TimeoutExpired:
        hung = not timed_out
        proc.kill()
        proc.wait()
    reader.join(5)
    returncode = 0 if hung else proc.returncode
    return ToolRun(returncode, "".join(lines), stamp[0] if stamp else None, hung, timed_out)


def first_error(result: perf_analyzer.PerfResult) -> str:
    if result.errors:
        return result.errors[0][:300]
    return f"perf_analyzer exited {result.returncode}, {result.request_count} requests"


def v1_measurement(server: Server, path: str, n: int, args, binary: Path) -> dict[str, Any]:
    """One load_client run: it opens its sessions, says so, then runs the warm-up and the counted
    window; the CPU is read over exactly that window, timed from its "ready" line."""
    command = native_tools.load_command(
        binary, server.address, MODEL, FEATURES, path, n, per_message=args.per_message,
        warmup=args.warmup, duration=args.duration,
    )  # fmt: skip
    with CpuSampler(server) as sampler:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready_line = proc.stdout.readline()
        counted_from = time.monotonic() + args.warmup
        try:
            rest, err = proc.communicate(timeout=120 + args.warmup + args.duration)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return {"error": "load_client did not finish within 120 s of its window"}
    try:
        result = native_tools.parse_load(ready_line + rest)
    except (RuntimeError, ValueError, KeyError) as e:
        return {"error": f"{e} {err.strip()[-200:]}".strip()}
    cores = sampler.cores(counted_from, counted_from + args.duration)
    side: dict[str, Any] = {
        "steps_per_s": result.steps_per_s,
        "msgs_per_s": result.msgs_per_s,
        "p50_us": result.p50_us,
        "p99_us": result.p99_us,
        "server_cores": cores,
        "server_us_per_step": per_step_us(cores, result.steps_per_s),
    }
    if result.errors:
        side["error"] = f"{result.errors} failed: {result.first_error[:300]}"
    return side


# ---- cells ------------------------------------------------------------------------------------


def cell_plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(api, path, concurrency) of every cell, in the order they run."""
    plan = [("oip", p, n) for p in args.oip_paths for n in args.concurrency]
    for path in args.v1_paths:
        counts = args.packed_concurrency if path == "packed" else args.concurrency
        plan += [("v1", path, n) for n in counts]
    return plan


def run_cell(
    servers: dict[str, Server], api: str, path: str, n: int, args, tools: dict[str, Path]
) -> dict[str, Any]:
    measure = oip_measurement if api == "oip" else v1_measurement
    binary = tools["perf_analyzer"] if api == "oip" else tools["load_client"]
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    order = list(servers)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            server = servers[name]
            side = measure(server, path, n, args, binary)
            if server.restart_if_dead(f"{api} {path} c={n}"):
                side["error"] = f"the server exited: {side.get('error', '')}".rstrip(": ")
            samples[name].append(side)
    per_message = min(args.per_message, n) if path == "packed" else 1
    cell: dict[str, Any] = {"api": api, "path": path, "concurrency": n, "per_message": per_message}
    for name, reps in samples.items():
        cell[name] = summarize(reps)
    return cell


METRICS = ("steps_per_s", "msgs_per_s", "p50_us", "p99_us", "server_cores", "server_us_per_step")


def summarize(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric's median over the measurements that have it, without the failed ones; the
    errors beside (None when none failed)."""
    good = [r for r in reps if "error" not in r]
    side: dict[str, Any] = {}
    for key in METRICS:
        values = [r[key] for r in good if r.get(key) is not None]
        side[key] = statistics.median(values) if values else None
    errors = [r["error"] for r in reps if "error" in r]
    side["errors"] = errors or None
    side["notes"] = [r["note"] for r in reps if "note" in r] or None
    side["reps"] = reps
    return side


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
    if not (store / MODEL).is_dir():
        print(f"bench: training {MODEL} (--quick) into {store}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "training", "train", "--quick", MODEL, "--store", str(store),
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


def cpu_times() -> list[int]:
    """The machine's jiffies: user nice system idle iowait irq softirq steal (from /proc/stat)."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:9]]


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the vCPUs' time the hypervisor gave to someone else between two cpu_times()."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return delta[7] / max(1, sum(delta))


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
        "libgrpc++": debian_version("libgrpc++-dev"),
        "kernel": platform.release(),
    }


def debian_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True,
                          text=True)  # fmt: skip
    return done.stdout.strip() or "unknown"


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
    p.add_argument("--oip-paths", nargs="*", default=list(OIP_PATHS), choices=OIP_PATHS)
    p.add_argument("--v1-paths", nargs="*", default=list(V1_PATHS), choices=V1_PATHS)
    p.add_argument("--concurrency", nargs="+", type=count, default=list(CONCURRENCY),
                   help="sequences (OIP) and sessions (rnnserve.v1 unary, stream)")  # fmt: skip
    p.add_argument("--packed-concurrency", nargs="+", type=count, default=list(PACKED_CONCURRENCY),
                   help="sessions of StepMany packed")  # fmt: skip
    p.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    p.add_argument("--per-message", type=count, default=64, help="StepMany sessions per message")
    p.add_argument("--reps", type=count, default=3, help="measurements per server and cell")
    p.add_argument("--window-ms", type=bounded(int, 100), default=800,
                   help="perf_analyzer's measurement window (it runs three)")  # fmt: skip
    p.add_argument("--warmup", type=seconds, default=0.3, help="load_client: seconds not counted")
    p.add_argument("--duration", type=bounded(float, 0.0, strict=True), default=1.0,
                   help="load_client: seconds counted")  # fmt: skip
    p.add_argument("--wait-quiet", type=seconds, default=0.0, help="wait up to this many seconds "
                   "for a 1-minute load average < 1.0 before measuring")  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 64, one measurement")
    args = p.parse_args(argv)
    if args.store and not (args.store / MODEL).is_dir():
        p.error(f"--store {args.store} has no {MODEL}")
    if args.quick:
        args.concurrency, args.packed_concurrency, args.reps = [1, 64], [64], 1
        args.window_ms, args.warmup, args.duration = 500, 0.2, 0.6
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = find_store(args.store)
    tools = {**native_tools.ensure_built(), "perf_analyzer": perf_analyzer.ensure()}
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet else {}
    started = time.monotonic()
    results: dict[str, Any] = {
        "machine": machine(),
        "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "quiet": quiet,
        "load_before": os.getloadavg(),
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "native_lib": os.environ.get(NATIVE_LIB) or None,  # None: the package's build
    }
    machine_before = cpu_times()
    results["cells"], results["crashes"] = measure_cells(store, args, tools)
    results["ceiling"] = ceiling.measure(store, [MODEL], (1, 16, 64, 256, 1000))
    results["load_after"] = os.getloadavg()
    results["steal"] = steal_share(machine_before, cpu_times())
    results["seconds"] = round(time.monotonic() - started)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_results.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write_all(results, args.out)
    print(report.targets_text(results))
    print(f"bench: done in {results['seconds']} s; wrote {args.out}/benchmarks.md")
    return 0


def measure_cells(
    store: Path, args: argparse.Namespace, tools: dict[str, Path]
) -> tuple[list[dict[str, Any]], dict[str, list]]:
    """Every cell on every server; the servers are stopped however it ends."""
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-canned-") as tmp:
        canned = native_tools.write_canned(store, MODEL, Path(tmp))
        commands = server_commands(store, tools["echo_server"], canned)
        servers = {name: Server(name, commands[name], server_env(name)) for name in args.servers}
        try:
            for s in servers.values():
                s.start()
            for api, path, n in cell_plan(args):
                cells.append(run_cell(servers, api, path, n, args, tools))
                print(report.cell_line(cells[-1]), flush=True)
        finally:
            for s in servers.values():
                s.stop()
    return cells, {name: s.crashes for name, s in servers.items()}


if __name__ == "__main__":
    sys.exit(main())
