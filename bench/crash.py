"""The crash check: many short perf_analyzer runs of concurrent sequence streams against one server,
counting the times the server process exits (issue 11 asks 0 in 20 runs each at 64, 256 and 1,000).

    python -m bench.crash --runs 20     # the native core, ~4 minutes

One server is started and kept while it lives; after every run it must still be running. A run
is perf_analyzer ``--async --streaming`` on seq_lstm (sequences of 50±20 steps) for three windows
of ``--window-ms``, killed after ``--timeout`` seconds (a hang, counted apart). When the server
has exited, the crash is counted with its exit status (negative: the signal) and the server is
started again for the next run. Writes docs/bench_crash.json and the crash section of
docs/benchmarks.md (``bench.report.write_crash_markdown``); exit status 1 when any run crashed
the server.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import perf_analyzer, report, run

CONCURRENCY = (64, 256, 1000)


def one_run(server: run.Server, binary: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One perf_analyzer run; what it saw and whether the server outlived it."""
    command = perf_analyzer.command(
        binary, server.address, run.MODEL, concurrency=n, streaming=True,
        sequence_length=run.SEQUENCE_LENGTH, window_ms=args.window_ms,
        extra=["--sequence-length-variation", str(run.SEQUENCE_VARIATION)],
    )  # fmt: skip
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent.parent / "lib")}
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=args.timeout
        )
        result = perf_analyzer.parse(done.returncode, done.stdout + done.stderr)
        outcome = {"steps_per_s": result.throughput, "errors": result.errors[:3], "hang": False}
    except subprocess.TimeoutExpired:
        outcome = {"steps_per_s": 0.0, "errors": [], "hang": True}
    outcome["seconds"] = round(time.monotonic() - started, 2)
    outcome["server_exit"] = None if server.alive() else server.proc.returncode  # type: ignore[union-attr]
    return outcome


def check(server: run.Server, binary: Path, args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.concurrency:
        for i in range(args.runs):
            outcome = {"concurrency": n, "run": i + 1, **one_run(server, binary, n, args)}
            rows.append(outcome)
            print(crash_line(outcome), flush=True)
            if outcome["server_exit"] is not None:
                server.start()  # the next run gets a fresh server
    return {"runs": rows, "summary": summarize(rows, args.concurrency)}


def crash_line(o: dict[str, Any]) -> str:
    state = "ALIVE" if o["server_exit"] is None else f"EXITED ({o['server_exit']})"
    extra = " HANG" if o["hang"] else ""
    extra += f" errors: {o['errors'][0][:120]}" if o["errors"] else ""
    return (
        f"c={o['concurrency']:<5d} run {o['run']:>2}: server {state}, "
        f"{o['steps_per_s']:,.0f} steps/s, {o['seconds']} s{extra}"
    )


def summarize(rows: list[dict[str, Any]], concurrency: list[int]) -> list[dict[str, Any]]:
    """Per concurrency: runs, server exits, hangs, runs with perf_analyzer errors."""
    summary = []
    for n in concurrency:
        mine = [r for r in rows if r["concurrency"] == n]
        summary.append(
            {
                "concurrency": n,
                "runs": len(mine),
                "crashes": sum(r["server_exit"] is not None for r in mine),
                "hangs": sum(r["hang"] for r in mine),
                "runs_with_errors": sum(bool(r["errors"]) for r in mine),
                "median_steps_per_s": sorted(r["steps_per_s"] for r in mine)[len(mine) // 2]
                if mine
                else 0.0,
            }
        )
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    count = run.bounded(int, 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=None)
    p.add_argument("--runs", type=count, default=20, help="runs per concurrency")
    p.add_argument("--concurrency", nargs="+", type=count, default=list(CONCURRENCY))
    p.add_argument("--window-ms", type=run.bounded(int, 100), default=500)
    p.add_argument("--timeout", type=run.bounded(float, 1.0), default=60.0,
                   help="seconds before a run counts as a hang")  # fmt: skip
    p.add_argument("--out", type=Path, default=run.ROOT / "docs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store = run.find_store(args.store)
    binary = perf_analyzer.ensure()
    command = run.serve_command(store)
    server = run.Server("native", command, run.server_env("native"))
    started = time.monotonic()
    server.start()
    try:
        results = check(server, binary, args)
    finally:
        server.stop()
    results.update(
        command="python -m bench.crash " + " ".join(sys.argv[1:] if argv is None else argv),
        window_ms=args.window_ms,
        seconds=round(time.monotonic() - started),
        finished_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_crash.json").write_text(json.dumps(results, indent=1) + "\n")
    report.write_crash_markdown(results, args.out / "benchmarks.md")
    for s in results["summary"]:
        print(
            f"c={s['concurrency']}: {s['crashes']} crashes, {s['hangs']} hangs, "
            f"{s['runs_with_errors']} runs with errors in {s['runs']} runs"
        )
    return 1 if any(s["crashes"] for s in results["summary"]) else 0


if __name__ == "__main__":
    sys.exit(main())
