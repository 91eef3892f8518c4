"""PredictBatcher: concurrent Predict calls of one model version → one sequence-graph call.

Whole-sequence requests are stateless, so rows of different requests can share a backend call
freely: the sequence graph takes right-padded rows with their lengths and answers each row exactly
as if it ran alone. Like the step scheduler there is no timer: a lone request runs at once, and
while one batch runs in the executor the next one forms from whatever arrives meanwhile.

A backend call's memory grows with its padded elements, rows × T_max (about 4.5 kB each for a
128-unit LSTM in ONNX Runtime), not with the steps the rows really carry: one long row among
short ones would make every row as long. So a batch's rows are sorted by length and cut into
calls of similar lengths (``plan_calls``), each within ``max_rows`` rows and ``max_padded``
padded elements; any single row fits, as ``max_padded`` is at least the longest input. After the
call that memory goes back to the system: the ONNX backend shrinks its arena after sequence
calls, and ``return_large_blocks_to_the_system`` keeps glibc from holding the freed blocks.
"""

from __future__ import annotations

import asyncio
import ctypes
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

MAX_PADDED_STEPS = 16_384  # rows × T_max of one sequence-graph call: 16 rows of 1,024 steps
PADDING_SLACK = 1_024  # padded elements a call may waste beyond its real ones (see plan_calls)
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def return_large_blocks_to_the_system() -> bool:
    """Have glibc serve every allocation of 1 MiB or more with its own mapping, unmapped when
    freed. By default the threshold adapts upwards (up to 32 MiB) after the first large free,
    and from then on a Predict call's tensors come from the heaps of the worker threads, which
    keep freed memory: RSS grew by ~50 MiB a request of 64 x 1,024 steps and stayed. Setting
    it fixes the threshold. Process-wide; False where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


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
        max_padded: int = MAX_PADDED_STEPS,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if max_padded < backend.manifest.input.max_steps:
            raise ValueError(
                f"max_padded must hold one row of the longest input "
                f"({backend.manifest.input.max_steps} steps), got {max_padded}"
            )
        self.name = name
        self._backend = backend
        self._executor = executor
        self.max_rows = max_rows
        self.max_padded = max_padded
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
        rows = [r for p in batch for r in p.rows]
        loop = asyncio.get_running_loop()
        y: np.ndarray | None = None  # (B, O) in the batch's row order
        for call in plan_calls([len(r) for r in rows], self.max_rows, self.max_padded):
            x, lengths = codec.batch_sequences([rows[i] for i in call])  # (b, T_max, ...)
            part = await loop.run_in_executor(self._executor, self._backend.sequence, x, lengths)
            if y is None:
                y = np.empty((len(rows), *part.shape[1:]), part.dtype)
            y[call] = part
            self.batches += 1
            self._on_batch(len(call))
        assert y is not None
        self.requests += len(batch)
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


def plan_calls(lengths: list[int], max_rows: int, max_padded: int) -> list[list[int]]:
    """Row positions grouped into backend calls: by ascending length, a call takes the next row
    while it stays within ``max_rows`` rows and ``max_padded`` padded elements (rows × the
    call's longest row) and pads at most its real elements plus ``PADDING_SLACK`` (so a long
    row never makes many short ones as long, while short rows of any lengths share a call)."""
    calls: list[list[int]] = []
    call: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        t = lengths[i]  # the longest in the call so far: lengths ascend
        padded = (len(call) + 1) * t
        fits = padded <= max_padded and padded <= 2 * (real + t) + PADDING_SLACK
        if call and (len(call) == max_rows or not fits):
            calls.append(call)
            call, real = [], 0
        call.append(i)
        real += t
    if call:
        calls.append(call)
    return calls
