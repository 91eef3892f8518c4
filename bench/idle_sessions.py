"""What idle sessions cost: open N sessions of a model and compare the RSS they add to their states.

Runs the real ``Engine`` (the store, the session store, the state pools) in this fresh process,
with no transport: RSS is read from /proc before and after opening ``count`` sessions (with the
garbage collector run first), and compared with the raw bytes of their recurrent states
(``count * manifest.state_bytes()``; for seq_lstm h and c are (2, 128) float32 each = 2,048 bytes).
The target is RSS added ≤ 1.5× raw. The process's thread count is reported too: an idle session
holds no task, thread or timer of its own.

    python -m bench.idle_sessions --store STORE [--model seq_lstm] [--count 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import threading
import time
from pathlib import Path

from serving.engine import Engine, EngineConfig

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


async def measure(store: Path, model: str, count: int) -> dict:
    engine = Engine(EngineConfig(store=store, max_sessions=count + 16))
    await engine.start()
    try:
        state_bytes = engine.model(model).manifest.state_bytes()
        gc.collect()
        before = rss_bytes()
        started = time.perf_counter()
        ids = [engine.open_session(model).session_id for _ in range(count)]
        open_s = time.perf_counter() - started
        gc.collect()
        after = rss_bytes()
        return {
            "model": model,
            "sessions": len(ids),
            "state_bytes_each": state_bytes,
            "raw_bytes": state_bytes * count,
            "rss_added_bytes": after - before,
            "ratio": (after - before) / (state_bytes * count),
            "open_seconds": open_s,
            "threads": threading.active_count(),
            "live": engine.live_sessions(model),
        }
    finally:
        await engine.stop(grace_s=1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", default="seq_lstm")
    p.add_argument("--count", type=int, default=100_000)
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args.store, args.model, args.count))))


if __name__ == "__main__":
    main()
