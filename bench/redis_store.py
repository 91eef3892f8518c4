"""The Redis session store against the memory store, side by side in one run (issue 12's targets).

    python -m bench.redis_store                    # 5 measurements per server and cell, ~2 minutes
    python -m bench.redis_store --idle 100000      # and what 100,000 idle sessions cost in Redis

What it does:
1. starts a ``redis-server`` on a free loopback port (no persistence unless ``--appendonly``) and
   two native servers, ``rnnserve serve --threads 1`` with ``--session-store memory`` and with
   ``--session-store redis://…`` (each its own process, ONNX Runtime, default batching);
2. for each cell, rnnserve.v1 ``Session`` streams at c=64 and ``StepMany`` packed with 64 sessions
   in one message, runs ``--reps`` load_client measurements per server, the servers taking turns
   (the order reversed every other rep); the ratio Redis / memory of each metric is taken per
   rep pair and the median kept, so a burst of load from elsewhere on the machine hits both sides;
3. with ``--idle N``: one more Redis server process opens N sessions and steps each once (so each
   holds a cached reply, as a live session does), and Redis's ``used_memory`` growth per session is
   compared with the raw bytes a session must keep: its state plus its cached reply's outputs.

Targets: stream ≥ 0.6× and packed ≥ 0.5× the memory store's steps/s; idle ≤ 1.5× raw.
Writes the results as JSON (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench import native_tools
from bench.run import (
    FEATURES,
    MODEL,
    ROOT,
    Server,
    bounded,
    find_store,
    serve_command,
    v1_measurement,
)

sys.path.insert(0, str(ROOT / "tests"))
from redis_support import RedisProcess

CELLS = (("stream", 64), ("packed", 64))
GOALS = {"stream": 0.6, "packed": 0.5}
IDLE_GOAL = 1.5
SIDES = ("memory", "redis")
OPEN_WINDOW = 256  # calls in flight while the idle sessions are opened and stepped


def server_env() -> dict[str, str]:
    """The native data plane; a core build named by RNNSERVE_NATIVE_LIB is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env["RNNSERVE_DATA_PLANE"] = "native"
    if "RNNSERVE_NATIVE_LIB" in os.environ:
        env["RNNSERVE_NATIVE_LIB"] = os.environ["RNNSERVE_NATIVE_LIB"]
    return env


def side_by_side(servers: dict[str, Server], args, binary: Path) -> list[dict[str, Any]]:
    cells = []
    for path, n in CELLS:
        reps: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for rep in range(args.reps):
            for name in SIDES if rep % 2 == 0 else SIDES[::-1]:
                reps[name].append(v1_measurement(servers[name], path, n, args, binary))
                if servers[name].restart_if_dead(f"{path} c={n}"):
                    reps[name][-1]["error"] = "the server exited"
        cells.append(summarize(path, n, reps))
        print(cell_line(cells[-1]), flush=True)
    return cells


def summarize(path: str, n: int, reps: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per side, and the median of the per-rep ratios Redis / memory."""
    cell: dict[str, Any] = {"path": path, "concurrency": n, "goal": GOALS[path]}
    for name, runs in reps.items():
        good = [r for r in runs if "error" not in r]
        cell[name] = {
            key: statistics.median(v) if (v := [r[key] for r in good if r.get(key)]) else None
            for key in ("steps_per_s", "p50_us", "p99_us", "server_us_per_step")
        }
        cell[name]["errors"] = [r["error"] for r in runs if "error" in r] or None
        cell[name]["reps"] = runs
    pairs = [
        (r["steps_per_s"], m["steps_per_s"])
        for r, m in zip(reps["redis"], reps["memory"], strict=True)
        if "error" not in r and "error" not in m and m["steps_per_s"]
    ]
    ratios = [r / m for r, m in pairs]
    cell["ratios"] = ratios
    cell["ratio"] = statistics.median(ratios) if ratios else None
    return cell


def cell_line(cell: dict[str, Any]) -> str:
    m, r = cell["memory"], cell["redis"]
    ratio = cell["ratio"]
    verdict = "n/a" if ratio is None else ("met" if ratio >= cell["goal"] else "MISSED")
    return (
        f"{cell['path']} c={cell['concurrency']}: memory {m['steps_per_s'] or 0:,.0f} / redis "
        f"{r['steps_per_s'] or 0:,.0f} steps/s, ratio {ratio or 0:.2f} (goal ≥ {cell['goal']}: "
        f"{verdict}; per rep {', '.join(f'{x:.2f}' for x in cell['ratios'])})"
    )


# ---- idle sessions ----------------------------------------------------------------------------


def idle_cost(store: Path, redis: RedisProcess, count: int) -> dict[str, Any]:
    """Opens ``count`` sessions on a Redis-backed server and steps each once; Redis's memory
    growth per session against its state and cached reply."""
    from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
    from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
    from serving.manifest import load_manifest, resolve

    m = load_manifest(resolve(store, MODEL))
    raw = m.state_bytes() + m.output.size * 4  # the state and one step's outputs (float32)
    server = Server("redis-idle", redis_serve(store, redis, count), server_env())
    server.start()
    try:
        redis.command("FLUSHALL")
        before = redis.info("used_memory")
        started = time.perf_counter()
        with grpc.insecure_channel(server.address) as channel:
            api = pb_grpc.RnnServeStub(channel)
            opening = pb.OpenSessionRequest(model=MODEL)
            ids = in_flight(count, lambda _: api.OpenSession.future(opening))
            x = pb.Input(features=pb.Features(values=[0.5] * FEATURES, steps=1))
            in_flight(count, lambda i: api.Step.future(
                pb.StepRequest(session_id=ids[i].session_id, step_index=0, input=x)))  # fmt: skip
        seconds = time.perf_counter() - started
        after = redis.info("used_memory")
        record = int(redis.command("STRLEN", f"rnnserve:s:{ids[0].session_id}").lstrip(":"))
    finally:
        server.stop()
    per_session = (after - before) / count
    return {
        "sessions": count,
        "raw_bytes_each": raw,
        "record_bytes_each": record,
        "redis_bytes_each": per_session,
        "ratio": per_session / raw,
        "goal": IDLE_GOAL,
        "open_and_step_seconds": seconds,
    }


def in_flight(count: int, call) -> list[Any]:
    """call(i) for i in [0, count), at most OPEN_WINDOW futures outstanding; the results."""
    results: list[Any] = [None] * count
    pending: list[tuple[int, Any]] = []
    for i in range(count):
        pending.append((i, call(i)))
        if len(pending) >= OPEN_WINDOW:
            for j, f in pending:
                results[j] = f.result(timeout=60)
            pending.clear()
    for j, f in pending:
        results[j] = f.result(timeout=60)
    return results


def redis_serve(store: Path, redis: RedisProcess, max_sessions: int) -> list[str]:
    return [*serve_command(store), "--session-store", redis.url,
            "--max-sessions", str(max(max_sessions + 1000, 100_000))]  # fmt: skip


# ---- the run ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--reps", type=bounded(int, 1), default=5, help="measurements per side and cell")
    p.add_argument("--warmup", type=bounded(float, 0.0), default=0.5)
    p.add_argument("--duration", type=bounded(float, 0.0, strict=True), default=2.0)
    p.add_argument("--idle", type=bounded(int, 0), default=0, help="idle sessions (0: none)")
    p.add_argument("--appendonly", choices=("no", "everysec", "always"), default="no",
                   help="Redis persistence (compose runs everysec)")  # fmt: skip
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    args.per_message = 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = find_store(args.store)
    binary = native_tools.ensure_built()["load_client"]
    flags = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench.redis_store", *flags]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": os.getloadavg(),
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        appendonly = args.appendonly != "no"
        redis = RedisProcess(Path(folder), appendonly, args.appendonly if appendonly else "always")
        redis.start()
        memory = [*serve_command(store), "--session-store", "memory"]
        servers = {
            "memory": Server("memory", memory, server_env()),
            "redis": Server("redis", redis_serve(store, redis, 0), server_env()),
        }
        try:
            if not args.skip_throughput:
                for s in servers.values():
                    s.start()
                results["cells"] = side_by_side(servers, args, binary)
                for s in servers.values():
                    s.stop()
            if args.idle:
                results["idle"] = idle_cost(store, redis, args.idle)
                print(f"idle: {json.dumps(results['idle'])}", flush=True)
        finally:
            for s in servers.values():
                s.stop()
            redis.stop()
    results["load_after"] = os.getloadavg()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
