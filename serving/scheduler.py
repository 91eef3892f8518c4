"""StepScheduler: one per streamable model version; many sessions' ready steps → one backend call.

``submit`` queues one step of one session and returns a future. A single loop task takes whatever is
queued, runs it as one batch in the executor (off the event loop) and, while that runs, the next
batch forms in the queue. A lone session never waits for a timer; ``max_queue_delay_s`` > 0 lets a
batch wait that long for company. Rules a batch obeys:

* at most one step per session (the engine serializes a session's calls; this is a second guard);
* one time length T per batch: rows stack on the batch dim without padding, so outputs are exact
  (padding would push the padded steps through the recurrence); other lengths wait for the next
  batch, which starts as soon as this one finishes;
* at most ``max_batch_size`` rows.

States are gathered from the model's ``StatePool`` before the call and scattered back after it, on
the event loop thread, so pool growth and slot reuse never race with a running batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from serving.backends import Backend
from serving.errors import RnnServeError, Unavailable
from serving.sessions import Session, StatePool

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PendingStep:
    session: Session
    x: np.ndarray  # (T, F) float32 or (T,) int64
    future: asyncio.Future[np.ndarray]  # resolves to y (T, O) once the new state is stored
    enqueued: float


class StepScheduler:
    def __init__(
        self,
        name: str,
        backend: Backend,
        pool: StatePool,
        executor: Executor,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {max_queue_delay_s}")
        self.name = name
        self._backend = backend
        self._pool = pool
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch or (lambda size: None)
        self._queue: deque[PendingStep] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.batches = 0  # counters for tests and the bench
        self.rows = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"sched:{self.name}")

    async def stop(self) -> None:
        """Run everything already queued, then end the loop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---- work ----------------------------------------------------------------------------------
    def submit(self, session: Session, x: np.ndarray) -> asyncio.Future[np.ndarray]:
        if self._stopping or self._task is None:
            raise Unavailable(f"{self.name} is not accepting steps (stopping or not started)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.append(PendingStep(session, x, fut, time.monotonic()))
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
            await self._wait_for_company()
            batch = self._take_batch()
            try:
                await self._run(batch)
            except Exception as e:  # never let one bad batch kill the model's loop
                log.exception("%s: batch of %d failed", self.name, len(batch))
                self._fail(batch, e)

    async def _wait_for_company(self) -> None:
        """With a queue delay set, wait for a fuller batch until the oldest step's deadline."""
        if self.max_queue_delay_s <= 0 or self._stopping:
            return
        deadline = self._queue[0].enqueued + self.max_queue_delay_s
        while len(self._queue) < self.max_batch_size and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[PendingStep]:
        """Up to max_batch_size steps of distinct sessions, all with the first step's T (FIFO).

        A session whose step is left behind has its later steps left behind too, so a session's
        steps never overtake each other (the engine's gate already sends one at a time).
        """
        steps = self._queue[0].x.shape[0]
        batch: list[PendingStep] = []
        seen: set[int] = set()
        rest: deque[PendingStep] = deque()
        while self._queue:
            p = self._queue.popleft()
            key = id(p.session)
            if key not in seen and len(batch) < self.max_batch_size and p.x.shape[0] == steps:
                batch.append(p)
            else:
                rest.append(p)
            seen.add(key)
        self._queue = rest
        return batch

    async def _run(self, batch: list[PendingStep]) -> None:
        slots = np.fromiter((p.session.slot for p in batch), dtype=np.int64, count=len(batch))
        x = np.stack([p.x for p in batch])  # (B, T, F) or (B, T)
        states = self._pool.gather(slots)  # [(L, B, H)]
        loop = asyncio.get_running_loop()
        y, new_states = await loop.run_in_executor(self._executor, self._backend.step, x, states)
        self._pool.scatter(slots, new_states)
        self.batches += 1
        self.rows += len(batch)
        self._on_batch(len(batch))
        for i, p in enumerate(batch):
            if not p.future.done():
                p.future.set_result(y[i])  # (T, O)

    def _fail(self, batch: list[PendingStep], err: Exception) -> None:
        wrapped = (
            err if isinstance(err, RnnServeError) else RnnServeError(f"inference failed: {err!r}")
        )
        for p in batch:
            if not p.future.done():
                p.future.set_exception(wrapped)
