"""Failover time (issue 12): from ``kill -9`` of a replica to the successful retry of each step it
cut, p50 and p99, over several kills.

    python -m bench.failover                  # 5 kills, 300 sessions over every transport, ~1 min
    python -m bench.failover --kills 10 --out failover.json

It runs the failover proof's own harness (tests/integration/test_failover.py): a redis-server,
three ``rnnserve serve --session-store redis://…`` replicas behind nginx on loopback, and clients
stepping sessions over every transport (rnnserve.v1 Step through our client, Session streams,
StepMany entries and packed blocks; OIP ModelInfer and ModelStreamInfer with
``sequence_step_index``), each retrying a cut step with the same index. For each kill the load
runs, one replica (in turn) gets SIGKILL, the clients retry through nginx, and the replica is
started again before the next kill. A sample is a step sent before the kill and answered after
it by a retry: seconds from the kill to that answer. The clients' first retry waits 50 ms
(``serving.client``'s backoff), which is part of every sample. At the end every session's outputs
are checked against the eager reference, so the numbers come from a run that lost nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import ROOT, find_store

sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]
from test_failover import Cluster, Load, assert_equals_offline, wait_for_progress  # noqa: E402

ROUNDS_PER_KILL = 150  # an upper bound on each session's rounds: the clients stop at the end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, default=None, help="model store with seq_lstm")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    store = find_store(args.store)
    with tempfile.TemporaryDirectory(prefix="rnnserve-failover-") as folder:
        cluster = Cluster(store, Path(folder))
        try:
            cluster.start()
            results = measure(store, cluster, args.sessions, args.kills)
        finally:
            cluster.stop()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(store: Path, cluster: Cluster, sessions: int, kills: int) -> dict[str, Any]:
    assert cluster.nginx is not None
    load = Load(store, cluster.nginx.address, sessions, ROUNDS_PER_KILL * kills)
    load.open_sessions()
    load.pause = 0.02
    clients = threading.Thread(target=load.run, args=(range(ROUNDS_PER_KILL * kills),))
    clients.start()
    per_kill: list[list[float]] = []
    try:
        for k in range(kills):
            victim = cluster.replicas[k % len(cluster.replicas)]
            wait_for_progress(load, sessions)
            with load.lock:
                load.killed_at = time.monotonic()
            victim.signal(signal.SIGKILL)
            victim.wait()
            wait_for_progress(load, 2 * sessions)  # every session has moved on since the kill
            with load.lock:
                per_kill.append([s for t in load.recovered.values() for s in t])
                load.recovered = {t: [] for t in load.recovered}
                load.killed_at = None
            victim.start()
            victim.wait_serving()
    finally:
        load.stop.set()
        clients.join(120)
    if load.errors:
        raise RuntimeError(f"the clients failed: {load.errors[:3]}")
    assert_equals_offline(store, load)
    return report(per_kill, load, sessions)


def report(per_kill: list[list[float]], load: Load, sessions: int) -> dict[str, Any]:
    def summary(seconds: list[float]) -> dict[str, Any]:
        ms = np.array(seconds) * 1e3
        if not len(ms):
            return {"samples": 0}
        return {
            "samples": len(ms),
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1),
        }

    return {
        "sessions": sessions,
        "steps": load.done_steps,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "all": summary([s for kill in per_kill for s in kill]),
        "kills": [summary(kill) for kill in per_kill],
        "replies_resent": {t: n for t, n in load.mismatched.items() if n},
    }


def table(results: dict[str, Any]) -> str:
    rows = ["| kill | steps cut | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    named = [*((str(n + 1), k) for n, k in enumerate(results["kills"])), ("all", results["all"])]
    for name, r in named:
        cells = [r.get(key, "-") for key in ("samples", "p50_ms", "p99_ms", "max_ms")]
        rows.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    head = (
        f"failover: {results['sessions']} sessions over every transport, {results['steps']} "
        f"steps, outputs equal to the offline run; {results['cpus']} CPUs, "
        f"load average {results['load_average']:.1f}"
    )
    resent = results["replies_resent"]
    if resent:  # a proxy's fault the clients caught: see docs/operations.md
        head += "; replies that answered no request, sent again: " + ", ".join(
            f"{t} {n}" for t, n in resent.items()
        )
    return head + "\n" + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
