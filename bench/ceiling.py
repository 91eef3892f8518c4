"""The compute ceiling: the step graph in-process with ONNX Runtime, no transport, no Python glue.

Loads a model exactly as the server does (``serving.backends.load_model``: same ONNX file, same
intra-op threads, checksums verified) and calls ``backend.step`` on a (B, 1, F) batch, feeding the
new states back, as fast as it goes. Steps/s = B / seconds per call.

    python -m bench.ceiling --store STORE [--models seq_lstm sine] [--batches 1 16 64 256 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from serving.backends import Backend, initial_states, load_model

DEFAULT_BATCHES = (1, 16, 64, 256, 1000)


def time_calls(backend: Backend, batch: int, seconds: float) -> float:
    """Mean seconds per ``step`` call at this batch size over about ``seconds``."""
    m = backend.manifest
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(batch, 1, m.input.features or 1)).astype(np.float32)  # (B, 1, F)
    states = initial_states(m, batch)  # [(L, B, H)]
    _, states = backend.step(x, states)  # warm: first calls allocate
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or calls < 3:
        _, states = backend.step(x, states)
        calls += 1
    return elapsed / calls


def measure(
    store: Path,
    models: list[str],
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    seconds: float = 0.4,
    reps: int = 3,
    threads: int = 1,
) -> list[dict]:
    """One row per (model, batch): median over ``reps`` of the seconds per call, and steps/s."""
    rows = []
    for name in models:
        backend = load_model(store, name, threads=threads).backend
        for batch in batches:
            per_call = statistics.median(time_calls(backend, batch, seconds) for _ in range(reps))
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "us_per_call": per_call * 1e6,
                    "steps_per_s": batch / per_call,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--models", nargs="+", default=["seq_lstm", "sine"])
    p.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    p.add_argument("--seconds", type=float, default=0.4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rows = measure(
        args.store, args.models, tuple(args.batches), args.seconds, args.reps, args.threads
    )
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
