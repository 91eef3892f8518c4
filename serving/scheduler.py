"""StepScheduler: one per streamable model version; many sessions' ready steps → one backend call.

``submit`` queues one step of one session and returns a future. On the next event-loop turn whatever
is queued runs as one batch and, while that runs, the next batch forms in the queue; the batch's
completion starts the next one at once. A lone session never waits for a timer;
``max_queue_delay_s`` > 0 lets a batch wait that long for company.

Where a batch runs: in the executor (off the event loop), unless its predicted cost is within
``inline_budget_s``; then it runs right on the loop thread. For small batches of small models the
hop to a worker thread and back (two thread wake-ups, ~200 µs on a VM) costs several times the
compute (~35 µs for one LSTM step), and the backends release the GIL while they compute, so the
gRPC poller keeps receiving meanwhile. The cost is predicted by ``StepCost``, measured per model at
start.
Rules a batch obeys:

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
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass

import numpy as np

from serving.backends import Backend
from serving.errors import RnnServeError, Unavailable
from serving.sessions import Session, StatePool

log = logging.getLogger(__name__)


StepDone = Callable[[np.ndarray | None, BaseException | None], None]


GroupDone = Callable[[int, np.ndarray | None, BaseException | None], None]


Outcome = tuple[np.ndarray, list[np.ndarray]] | BaseException  # a backend call's (y, states)


class StepGroup:
    """Steps submitted together (one StepMany message's steps of one model): one future for all.

    Its members may land in different batches (another T, a full batch, a session's second step);
    the future resolves once every member is answered, with y (T, O) or the error per member, in
    submission order. ``on_done(pos, y, err)`` runs per member as it is answered, even if the
    future was cancelled meanwhile (the engine commits each step there).
    """

    __slots__ = ("future", "on_done", "outcomes", "remaining")

    def __init__(self, future: asyncio.Future[list], size: int, on_done: GroupDone) -> None:
        self.future = future
        self.on_done = on_done
        self.outcomes: list[np.ndarray | BaseException | None] = [None] * size
        self.remaining = size

    def answer(self, pos: int, y: np.ndarray | None, err: BaseException | None) -> None:
        self.on_done(pos, y, err)
        self.outcomes[pos] = y if err is None else err
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.outcomes)


@dataclass(slots=True)
class PendingStep:
    session: Session
    x: np.ndarray  # (T, F) float32 or (T,) int64
    future: asyncio.Future[np.ndarray] | None  # resolves to y (T, O) once the state is stored
    enqueued: float
    on_done: StepDone | None = None  # called (y, None) or (None, error) even if future is cancelled
    group: StepGroup | None = None  # set for members of submit_many (then future is None)
    pos: int = 0  # the member's position in its group


class StepCost:
    """Predicted seconds of one backend step call: ``fixed_s + per_row_s * rows``, where rows is
    batch × time steps; ``StepScheduler`` runs a batch inline when the prediction is within its
    budget. Unknown until measured: then every batch predicts as infinitely costly (executor)."""

    __slots__ = ("fixed_s", "per_row_s")

    def __init__(self, fixed_s: float = float("inf"), per_row_s: float = 0.0) -> None:
        self.fixed_s = fixed_s
        self.per_row_s = per_row_s

    @classmethod
    def from_timings(cls, one_row_s: float, rows: int, many_rows_s: float) -> StepCost:
        """The line through (1, one_row_s) and (rows, many_rows_s)."""
        per_row = max(0.0, (many_rows_s - one_row_s) / max(1, rows - 1))
        return cls(max(0.0, one_row_s - per_row), per_row)

    def predict(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows


class StepScheduler:
    """Callback-driven, so a step costs few event-loop turns (each turn is latency for a lone
    session): a ``call_soon`` dispatch gathers whatever was submitted in the same turn, the
    executor's completion comes back with one ``call_soon_threadsafe``, and that callback stores
    the states, answers the batch and dispatches the next one straight away."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        pool: StatePool,
        executor: Executor,
        max_batch_size: int = 256,
        max_queue_delay_s: float = 0.0,
        on_batch: Callable[[int], None] | None = None,
        inline_budget_s: float = 0.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_queue_delay_s < 0:
            raise ValueError(f"max_queue_delay must be >= 0, got {max_queue_delay_s}")
        if inline_budget_s < 0:
            raise ValueError(f"inline_budget must be >= 0, got {inline_budget_s}")
        self.name = name
        self._backend = backend
        self._pool = pool
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._on_batch = on_batch or (lambda size: None)
        self.inline_budget_s = inline_budget_s
        self.cost = StepCost()  # set by the engine once it has timed the model
        self._queue: deque[PendingStep] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # a batch is in the executor
        self._dispatch_pending = False  # a _dispatch is scheduled with call_soon
        self._timer: asyncio.TimerHandle | None = None  # queue-delay wake-up
        self._drained: asyncio.Future[None] | None = None  # stop() waits on it
        self._stopping = False
        self.batches = 0  # counters for tests and the bench
        self.rows = 0
        self.inline_batches = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Run everything already queued (without waiting for company), then stop."""
        self._stopping = True
        if self._loop is None:
            return
        self._cancel_timer()
        self._schedule()
        while self._busy or self._queue or self._dispatch_pending:
            self._drained = self._loop.create_future()
            await self._drained

    @property
    def pending(self) -> int:
        return len(self._queue)

    # ---- work ----------------------------------------------------------------------------------
    def submit(
        self, session: Session, x: np.ndarray, on_done: StepDone | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one step; ``on_done`` runs when it is answered, even if the future was
        cancelled meanwhile (the engine commits the step there, so a cancel cannot lose it)."""
        if self._stopping or self._loop is None:
            raise Unavailable(f"{self.name} is not accepting steps (stopping or not started)")
        fut: asyncio.Future[np.ndarray] = self._loop.create_future()
        self._queue.append(PendingStep(session, x, fut, time.monotonic(), on_done))
        self._schedule()
        return fut

    def submit_many(
        self, sessions: list[Session], xs: list[np.ndarray], on_done: GroupDone
    ) -> asyncio.Future[list]:
        """Queue one step for each of ``sessions`` with one wake-up and one future for the group.

        The future resolves to a list in submission order holding y (T, O) or the exception per
        step. A session may appear twice: its second step runs in a later batch (never two steps
        of one session in one batch), though the engine sends only one per session anyway.
        """
        if self._stopping or self._loop is None:
            raise Unavailable(f"{self.name} is not accepting steps (stopping or not started)")
        fut: asyncio.Future[list] = self._loop.create_future()
        group = StepGroup(fut, len(sessions), on_done)
        now = time.monotonic()
        self._queue.extend(
            PendingStep(sess, x, None, now, None, group, pos)
            for pos, (sess, x) in enumerate(zip(sessions, xs, strict=True))
        )
        if not sessions:
            fut.set_result([])
        self._schedule()
        return fut

    def _schedule(self) -> None:
        """Dispatch on the next loop turn, so steps submitted in this turn share the batch. While
        a batch runs there is nothing to do: its completion dispatches the next one."""
        if not self._busy and not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._dispatch_pending = False
        if self._busy or not self._queue:
            self._notify_if_drained()
            return
        if self._should_wait():
            return
        self._cancel_timer()
        batch = self._take_batch()
        try:
            slots = np.fromiter((p.session.slot for p in batch), dtype=np.int64, count=len(batch))
            x = np.stack([p.x for p in batch])  # (B, T, F) or (B, T)
            states = self._pool.gather(slots)  # [(L, B, H)]
            if self.cost.predict(x.shape[0] * x.shape[1]) <= self.inline_budget_s:
                self._run_inline(batch, slots, x, states)
                return
            work = self._executor.submit(self._backend.step, x, states)
        except Exception as e:  # never let one bad batch stop the model's scheduling
            log.exception("%s: batch of %d failed", self.name, len(batch))
            self._fail(batch, e)
            self._schedule()
            return
        self._busy = True
        loop = self._loop
        assert loop is not None
        work.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finish, batch, slots, done)
        )

    def _should_wait(self) -> bool:
        """With a queue delay set, wait for a fuller batch until the oldest step's deadline."""
        if self.max_queue_delay_s <= 0 or self._stopping:
            return False
        if len(self._queue) >= self.max_batch_size:
            return False
        remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
        if remaining <= 0:
            return False
        if self._timer is None:
            assert self._loop is not None
            self._timer = self._loop.call_later(remaining, self._on_timer)
        return True

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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

    def _run_inline(
        self, batch: list[PendingStep], slots: np.ndarray, x: np.ndarray, states: list[np.ndarray]
    ) -> None:
        """A batch cheaper than the thread hop: compute, store and answer it right here. The next
        batch starts on the next loop turn, so steps that arrived meanwhile can join it."""
        try:
            outcome: Outcome = self._backend.step(x, states)
        except Exception as e:
            outcome = e
        self.inline_batches += 1
        self._complete(batch, slots, outcome)
        self._schedule()

    def _finish(self, batch: list[PendingStep], slots: np.ndarray, work: Future) -> None:
        """On the loop, for a batch the executor ran: store, answer, start the next one."""
        self._busy = False
        try:
            outcome: Outcome = work.result()
        except BaseException as e:  # the backend raised, or the executor was shut down
            outcome = e
        self._complete(batch, slots, outcome)
        self._dispatch()

    def _complete(self, batch: list[PendingStep], slots: np.ndarray, outcome: Outcome) -> None:
        """Store the new states and answer the batch (or fail it with the backend's error)."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            y, new_states = outcome
            self._pool.scatter(slots, new_states)
        except BaseException as e:  # the backend's error (or the executor's), or the scatter's
            if not isinstance(e, RnnServeError | CancelledError):
                log.error("%s: batch of %d failed: %r", self.name, len(batch), e)
            self._fail(batch, e)
        else:
            self.batches += 1
            self.rows += len(batch)
            self._on_batch(len(batch))
            for i, p in enumerate(batch):
                _answer(p, y[i], None)  # (T, O)

    def _fail(self, batch: list[PendingStep], err: BaseException) -> None:
        wrapped = (
            err if isinstance(err, RnnServeError) else RnnServeError(f"inference failed: {err!r}")
        )
        for p in batch:
            _answer(p, None, wrapped)

    def _notify_if_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


def _answer(p: PendingStep, y: np.ndarray | None, err: BaseException | None) -> None:
    if p.group is not None:
        p.group.answer(p.pos, y, err)
        return
    if p.on_done is not None:
        p.on_done(y, err)
    assert p.future is not None
    if p.future.done():  # the caller gave up; on_done has recorded the outcome
        return
    if err is None:
        p.future.set_result(y)
    else:
        p.future.set_exception(err)
