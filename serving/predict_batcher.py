"""PredictBatcher: concurrent Predict calls of one model version → one sequence-graph call.

Whole-sequence requests are stateless, so rows of different requests can share a backend call
freely: the sequence graph takes right-padded rows with their lengths and answers each row exactly
as if it ran alone. Like the step scheduler there is no timer: a lone request runs at once, and
while one batch runs in the executor the next one forms from whatever arrives meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving import codec
from serving.backends import Backend
from serving.errors import RnnServeError, Unavailable

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingPredict:
    rows: list[np.ndarray]  # validated sequences: (T_i, F) float32 or (T_i,) int64
    future: asyncio.Future[np.ndarray]  # resolves to y (len(rows), O)


class PredictBatcher:
    def __init__(
        self,
        name: str,
        backend: Backend,
        executor: Executor,
        max_rows: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.name = name
        self._backend = backend
        self._executor = executor
        self.max_rows = max_rows
        self._on_batch = on_batch or (lambda rows: None)
        self._queue: deque[PendingPredict] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.batches = 0  # counters for tests and the bench
        self.requests = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"pred:{self.name}")

    async def stop(self) -> None:
        """Answer everything already queued, then end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    def submit(self, rows: list[np.ndarray]) -> asyncio.Future[np.ndarray]:
        if self._stopping or self._task is None:
            raise Unavailable(f"{self.name} is not accepting requests (stopping or not started)")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(PendingPredict(rows, fut))
        self._wake.set()
        return fut

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            try:
                await self._run(batch)
            except Exception as e:  # one failed call must not end the model's loop
                log.exception("%s: predict batch of %d requests failed", self.name, len(batch))
                self._fail(batch, e)

    def _take_batch(self) -> list[PendingPredict]:
        """Requests in arrival order while their rows fit in max_rows (always at least one)."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.max_rows:
            rows += len(self._queue[0].rows)
            batch.append(self._queue.popleft())
        return batch

    async def _run(self, batch: list[PendingPredict]) -> None:
        x, lengths = codec.batch_sequences([r for p in batch for r in p.rows])  # (B, T_max, ...)
        loop = asyncio.get_running_loop()
        y = await loop.run_in_executor(self._executor, self._backend.sequence, x, lengths)
        self.batches += 1
        self.requests += len(batch)
        self._on_batch(len(lengths))
        start = 0
        for p in batch:
            end = start + len(p.rows)
            if not p.future.done():
                p.future.set_result(y[start:end])  # (rows, O)
            start = end

    def _fail(self, batch: list[PendingPredict], err: Exception) -> None:
        wrapped = (
            err if isinstance(err, RnnServeError) else RnnServeError(f"inference failed: {err!r}")
        )
        for p in batch:
            if not p.future.done():
                p.future.set_exception(wrapped)
