"""StepScheduler: one per streamable model version; many sessions' ready steps → one backend call.

``submit`` queues one step of one session and returns a future; ``submit_block`` queues one step
for each of many distinct sessions as one item (a packed StepMany block), whose rows travel as one
array from submission to the answer, with no per-row work but the state slots' gather.

On the next event-loop turn whatever is queued runs as one batch and, while that runs, the next
batch forms in the queue; the batch's completion starts the next one at once. A lone session never
waits for a timer; ``max_queue_delay_s`` > 0 lets a batch wait that long for company.

Where a batch runs: in the executor (off the event loop), unless its predicted cost is within
``inline_budget_s`` and the model was idle; then it runs right on the loop thread. For small batches
of small models the hop to a worker thread and back (two thread wake-ups, ~200 µs on a VM) costs
several times the compute (~35 µs for one LSTM step), and the backends release the GIL while they
compute, so the gRPC poller keeps receiving meanwhile. The cost is predicted by ``StepCost``
from the batch's rows and time steps (priced apart: steps run one after another, rows side by
side), measured per model at start. "Idle" means no batch was answered in the last
``BUSY_GAP_S``: under load the next steps are already on their way, and the hop is what lets them
gather into the next batch (run inline, unary calls arriving one per loop turn each made a batch
of one, and 1,000 unary sessions got less done than 64).
Rules a batch obeys:

* at most one step per session (the engine serializes a session's calls; this is a second guard);
* one time length T per batch: rows stack on the batch dim without padding, so outputs are exact
  (padding would push the padded steps through the recurrence); other lengths wait for the next
  batch, which starts as soon as this one finishes;
* at most ``max_batch_size`` rows (a block that does not fit is split: its first rows join this
  batch, the rest stays in line for the next).

Single steps and blocks of one model and one T share a batch (one backend call).

States are gathered from the model's ``StatePool`` before the call and scattered back after it, on
the event loop thread, so pool growth and slot reuse never race with a running batch.

Each item of a batch is answered on its own: an answer callback that raises is logged with the
model's name and ends only its own item's future (with an error); the rest of the batch is still
answered and the next batch still runs. A backend answer whose outputs or states do not have the
call's rows (and T) fails the whole batch before any state is stored, so every item is answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from serving.backends import Backend
from serving.errors import RnnServeError, Unavailable
from serving.sessions import Session, StatePool

log = logging.getLogger(__name__)


StepDone = Callable[[np.ndarray | None, BaseException | None], None]


GroupDone = Callable[[int, np.ndarray | None, BaseException | None], None]


Outcome = tuple[np.ndarray, list[np.ndarray]] | BaseException  # a backend call's (y, states)


BlockDone = Callable[[int, int, np.ndarray | None, BaseException | None], None]


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
        """Commit member ``pos``; if ``on_done`` raises, the member's outcome is that error (the
        group still resolves) and the exception propagates for the scheduler to log."""
        try:
            self.on_done(pos, y, err)
        except Exception as e:
            self._record(pos, None, err or answer_failed(e))
            raise
        self._record(pos, y, err)

    def _record(self, pos: int, y: np.ndarray | None, err: BaseException | None) -> None:
        self.outcomes[pos] = y if err is None else err
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.outcomes)


class StepTiming(Protocol):
    def timed(self, queued_s: float, computed_s: float) -> None: ...


# Set by a transport around its engine call to learn how long its single step queued for its batch
# (submission to the batch's start) and how long that batch took (start to answer); called on the
# loop once the batch succeeded. Triton's statistics report these as queue and compute_infer.
step_timing: ContextVar[StepTiming | None] = ContextVar("step_timing", default=None)


@dataclass(slots=True)
class PendingStep:
    session: Session
    x: np.ndarray  # (T, F) float32 or (T,) int64
    future: asyncio.Future[np.ndarray] | None  # resolves to y (T, O) once the state is stored
    enqueued: float
    on_done: StepDone | None = None  # called (y, None) or (None, error) even if future is cancelled
    group: StepGroup | None = None  # set for members of submit_many (then future is None)
    pos: int = 0  # the member's position in its group
    timing: StepTiming | None = None  # step_timing's value where submit() was called

    def answer(self, y: np.ndarray | None, err: BaseException | None) -> None:
        """y (T, O), or the error. If ``on_done`` raises, the future gets an error and the
        exception propagates for the scheduler to log."""
        if self.group is not None:
            self.group.answer(self.pos, y, err)
            return
        future = self.future
        assert future is not None
        if self.on_done is not None:
            try:
                self.on_done(y, err)
            except Exception as e:
                if not future.done():
                    future.set_exception(err or answer_failed(e))
                raise
        if future.done():  # the caller gave up; on_done has recorded the outcome
            return
        if err is None:
            future.set_result(y)
        else:
            future.set_exception(err)


class BlockJoin:
    """One submitted block: its parts may run in different batches (a block larger than the room
    left in a batch is split); the future resolves once every row is answered, with an error if
    ``on_done`` raised for any part (the exception propagates for the scheduler to log)."""

    __slots__ = ("failure", "future", "on_done", "remaining")

    def __init__(self, future: asyncio.Future[None], rows: int, on_done: BlockDone) -> None:
        self.future = future
        self.on_done = on_done
        self.remaining = rows
        self.failure: BaseException | None = None  # why on_done raised, for the future

    def answer(
        self, start: int, stop: int, y: np.ndarray | None, err: BaseException | None
    ) -> None:
        try:
            self.on_done(start, stop, y, err)
        except Exception as e:
            self.failure = self.failure or answer_failed(e)
            raise
        finally:  # the waiter must wake even if on_done failed
            self.remaining -= stop - start
            if self.remaining == 0 and not self.future.done():
                if self.failure is None:
                    self.future.set_result(None)
                else:
                    self.future.set_exception(self.failure)


@dataclass(slots=True)
class PendingBlock:
    """Rows ``start:start + len(sessions)`` of a submitted block (all of it unless split)."""

    sessions: list[Session]  # distinct
    slots: np.ndarray  # (n,) int64: the sessions' state rows
    x: np.ndarray  # (n, T, F) float32 or (n, T) int64
    join: BlockJoin
    enqueued: float
    start: int = 0

    @property
    def rows(self) -> int:
        return len(self.sessions)

    def split(self, head: int) -> tuple[PendingBlock, PendingBlock]:
        """The first ``head`` rows and the rest, as two parts of the same block."""
        s, j, t = self.sessions, self.join, self.enqueued
        return (
            PendingBlock(s[:head], self.slots[:head], self.x[:head], j, t, self.start),
            PendingBlock(s[head:], self.slots[head:], self.x[head:], j, t, self.start + head),
        )

    def answer(self, y: np.ndarray | None, err: BaseException | None) -> None:
        """y (n, T, O), or the error for every row."""
        self.join.answer(self.start, self.start + len(self.sessions), y, err)


Pending = PendingStep | PendingBlock


class Batch:
    """What one backend call answers: queue items, their rows in order, their time steps, and
    whether any is a block (a batch of single steps only keeps the simple one-row-per-item
    paths)."""

    __slots__ = ("blocks", "items", "rows", "started", "steps")

    def __init__(self, items: list[Pending], rows: int, blocks: int, steps: int) -> None:
        self.items = items
        self.rows = rows
        self.blocks = blocks
        self.steps = steps
        self.started = time.monotonic()  # taken from the queue: its rows stop queueing here


BUSY_GAP_S = 200e-6  # a step this soon after the last answer means load: no inline run
# measured slopes are scaled by these (see StepCost.from_timings): a row's and a step's by the
# first, a row × step's (where the cost per row and step grows with the call's size) by the second
COST_MARGIN = 1.25
CROSS_COST_MARGIN = 1.5


class StepCost:
    """Predicted seconds of one backend step call of ``rows`` sessions × ``steps`` time steps:

        one_s + (rows - 1) * per_row_s + (steps - 1) * (per_step_s + (rows - 1) * per_row_step_s)

    Batch rows and time steps cost differently: the rows of one time step are one vectorized
    matrix product, while the time steps run one after another, each with its own overhead; so
    a single rows × steps count priced a long call of one session (1 × 256) like a wide call of
    one step (256 × 1) and underestimated it about 2x. ``StepScheduler`` runs a batch inline when
    the prediction is within its budget. Unknown until measured: then every batch predicts as
    infinitely costly (executor)."""

    __slots__ = ("one_s", "per_row_s", "per_row_step_s", "per_step_s")

    def __init__(
        self,
        one_s: float = float("inf"),
        per_row_s: float = 0.0,
        per_step_s: float = 0.0,
        per_row_step_s: float = 0.0,
    ) -> None:
        self.one_s = one_s  # one row, one step
        self.per_row_s = per_row_s  # each further row of a one-step call
        self.per_step_s = per_step_s  # each further step of a one-row call
        self.per_row_step_s = per_row_step_s  # each further row × each further step

    @classmethod
    def from_timings(
        cls, rows: int, steps: int, one_s: float, rows_s: float, steps_s: float, both_s: float
    ) -> StepCost:
        """The bilinear surface through the calls timed at (1, 1), (rows, 1), (1, steps) and
        (rows, steps), its slopes raised so it errs high: erring high costs one thread hop
        (~200 µs), erring low blocks the event loop. The row × step slope gets the larger margin:
        the cost per row and step grows with the call's size past the timed corner (larger
        outputs, colder caches; a 64 × 256 call cost up to 1.3x the bilinear guess from 32 × 16),
        and timings are noisy on a shared machine."""
        extra_rows, extra_steps = rows - 1, steps - 1
        per_row = (rows_s - one_s) / extra_rows if extra_rows else 0.0
        per_step = (steps_s - one_s) / extra_steps if extra_steps else 0.0
        cross = extra_rows * extra_steps
        per_row_step = ((both_s - steps_s) - (rows_s - one_s)) / cross if cross else 0.0
        return cls(
            one_s,
            max(0.0, per_row) * COST_MARGIN,
            max(0.0, per_step) * COST_MARGIN,
            max(0.0, per_row_step) * CROSS_COST_MARGIN,
        )

    def predict(self, rows: int, steps: int) -> float:
        extra_rows = rows - 1
        return (
            self.one_s
            + extra_rows * self.per_row_s
            + (steps - 1) * (self.per_step_s + extra_rows * self.per_row_step_s)
        )


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
        self._queue: deque[Pending] = deque()
        self._queued_rows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False  # a batch is in the executor
        self._dispatch_pending = False  # a _dispatch is scheduled with call_soon
        self._timer: asyncio.TimerHandle | None = None  # queue-delay wake-up
        self._drained: asyncio.Future[None] | None = None  # stop() waits on it
        self._stopping = False
        self.batches = 0  # counters for tests, the bench and Triton's statistics
        self.rows = 0
        self.inline_batches = 0
        self._answered_at = -float("inf")  # perf_counter() when the last batch was answered

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
        """Rows (steps) waiting for a batch."""
        return self._queued_rows

    # ---- work ----------------------------------------------------------------------------------
    def submit(
        self, session: Session, x: np.ndarray, on_done: StepDone | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one step; ``on_done`` runs when it is answered, even if the future was
        cancelled meanwhile (the engine commits the step there, so a cancel cannot lose it)."""
        if self._stopping or self._loop is None:
            raise Unavailable(f"{self.name} is not accepting steps (stopping or not started)")
        fut: asyncio.Future[np.ndarray] = self._loop.create_future()
        timing = step_timing.get()
        self._queue.append(PendingStep(session, x, fut, time.monotonic(), on_done, timing=timing))
        self._queued_rows += 1
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
        self._queued_rows += len(sessions)
        if not sessions:
            fut.set_result([])
        self._schedule()
        return fut

    def submit_block(
        self, sessions: list[Session], x: np.ndarray, on_done: BlockDone
    ) -> asyncio.Future[None]:
        """Queue one step for each of ``sessions`` (distinct) as one item: ``x`` is (N, T, F) or
        (N, T), row i being session i's step. ``on_done(start, stop, y, err)`` runs on the loop for
        rows start:stop as they are answered — y (stop - start, T, O) with the states stored, or
        the error — even if the returned future (set once every row is answered) was cancelled.
        Usually that is one call for the whole block; a block split over batches gets one per part.
        """
        if self._stopping or self._loop is None:
            raise Unavailable(f"{self.name} is not accepting steps (stopping or not started)")
        n = len(sessions)
        if len(x) != n:
            raise ValueError(f"{n} sessions for {len(x)} rows of inputs")
        if len(set(map(id, sessions))) != n:  # one batch must never step a session twice
            raise ValueError("a block's sessions must be distinct")
        fut: asyncio.Future[None] = self._loop.create_future()
        if not n:
            fut.set_result(None)
            return fut
        slots = np.fromiter([s.slot for s in sessions], np.int64, n)  # (N,)
        join = BlockJoin(fut, n, on_done)
        self._queue.append(PendingBlock(sessions, slots, x, join, time.monotonic()))
        self._queued_rows += n
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
            slots, x = _rows_of(batch)  # (B,), (B, T, F) or (B, T)
            states = self._pool.gather(slots)  # [(L, B, H)]
            if self._runs_inline(x.shape[0], x.shape[1]):
                self._run_inline(batch, slots, x, states)
                return
            work = self._executor.submit(self._backend.step, x, states)
        except Exception as e:  # never let one bad batch stop the model's scheduling
            log.exception("%s: batch of %d failed", self.name, batch.rows)
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
        if self._queued_rows >= self.max_batch_size:
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

    def _take_batch(self) -> Batch:
        """Up to max_batch_size rows of distinct sessions, all with the first item's T (FIFO).

        A session whose step is left behind has its later steps left behind too, so a session's
        steps never overtake each other (the engine's gate already sends one at a time). A block
        joins whole, or split when it does not fit (the rest keeps its place in line), or not at all
        when one of its sessions is already in the batch or left behind.
        """
        queue, room, blocks = self._queue, self.max_batch_size, 0
        first = queue[0]
        steps = first.x.shape[0] if type(first) is PendingStep else first.x.shape[1]
        items: list[Pending] = []
        seen: set[int] = set()  # sessions taken or left behind so far
        rest: deque[Pending] = deque()
        while queue:
            if not room:  # nothing more can join: the rest keeps its order
                rest.extend(queue)
                queue.clear()
                break
            p = queue.popleft()
            if type(p) is PendingStep:
                key = id(p.session)
                if key not in seen and p.x.shape[0] == steps:
                    items.append(p)
                    room -= 1
                else:
                    rest.append(p)
                seen.add(key)
                continue
            if p.x.shape[1] == steps and (not seen or seen.isdisjoint(map(id, p.sessions))):
                taken = p
                if p.rows > room:
                    taken, left = p.split(room)
                    rest.append(left)
                items.append(taken)
                room -= taken.rows
                blocks += 1
            else:
                rest.append(p)
            if queue and room:  # later steps of its sessions must not join or overtake it
                seen.update(map(id, p.sessions))
        self._queue = rest
        rows = self.max_batch_size - room
        self._queued_rows -= rows
        return Batch(items, rows, blocks, steps)

    def _runs_inline(self, rows: int, steps: int) -> bool:
        """Cheap enough, and the model idle (see the module docstring)."""
        if self.cost.predict(rows, steps) > self.inline_budget_s:
            return False
        return time.perf_counter() - self._answered_at >= BUSY_GAP_S

    def _run_inline(
        self, batch: Batch, slots: np.ndarray, x: np.ndarray, states: list[np.ndarray]
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

    def _finish(self, batch: Batch, slots: np.ndarray, work: Future) -> None:
        """On the loop, for a batch the executor ran: store, answer, start the next one."""
        self._busy = False
        try:
            outcome: Outcome = work.result()
        except BaseException as e:  # the backend raised, or the executor was shut down
            outcome = e
        self._complete(batch, slots, outcome)
        self._dispatch()

    def _complete(self, batch: Batch, slots: np.ndarray, outcome: Outcome) -> None:
        """Store the new states and answer the batch (or fail it with the backend's error)."""
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            y, new_states = outcome
            self._check_outputs(batch, y, new_states)
            self._pool.scatter(slots, new_states)
        except BaseException as e:  # the backend's error (or the executor's), or the scatter's
            if not isinstance(e, RnnServeError | CancelledError):
                log.error("%s: batch of %d failed: %r", self.name, batch.rows, e)
            self._fail(batch, e)
        else:
            self._count(batch)
            try:
                self._on_batch(batch.rows)
            except Exception:  # a metrics hook must not keep the batch from being answered
                log.exception("%s: the on_batch hook failed", self.name)
            self._answer_rows(batch, y)
        self._answered_at = time.perf_counter()

    def _count(self, batch: Batch) -> None:
        self.batches += 1
        self.rows += batch.rows
        now = time.monotonic()
        for p in batch.items:
            if type(p) is PendingStep and p.timing is not None:
                p.timing.timed(batch.started - p.enqueued, now - batch.started)

    def _check_outputs(self, batch: Batch, y: np.ndarray, states: list[np.ndarray]) -> None:
        """A step graph must answer every row of the call: outputs or states of another shape are
        the batch's error, raised before any state is stored. Unchecked, the items past the rows
        answered never got an answer (their waiters hung, their sessions stayed busy for good),
        and a state of one row was broadcast to every session of the batch (~1 µs a batch)."""
        rows = batch.rows
        answered_rows = y.ndim == 3 and y.shape[:2] == (rows, batch.steps)
        if answered_rows and all(s.ndim == 3 and s.shape[1] == rows for s in states):
            return
        raise ValueError(
            f"the step graph answered outputs {list(y.shape)} and states "
            f"{[list(s.shape) for s in states]} for {rows} rows x {batch.steps} steps"
        )

    def _answer_rows(self, batch: Batch, y: np.ndarray) -> None:
        """Hand each item its rows of y (B, T, O). Each item is answered on its own: one whose
        callback raises is logged (its own future gets an error) and the rest are still
        answered, or their futures would hang and their sessions stay busy for good."""
        if not batch.blocks:
            for i, p in enumerate(batch.items):
                try:
                    p.answer(y[i], None)  # (T, O)
                except Exception:
                    self._log_answer_failure()
            return
        row = 0
        for p in batch.items:
            try:
                if type(p) is PendingBlock:
                    n = p.rows
                    p.answer(y[row : row + n], None)  # (n, T, O)
                else:
                    n = 1
                    p.answer(y[row], None)  # type: ignore[arg-type]  # (T, O)
            except Exception:
                self._log_answer_failure()
            row += n

    def _fail(self, batch: Batch, err: BaseException) -> None:
        wrapped = (
            err if isinstance(err, RnnServeError) else RnnServeError(f"inference failed: {err!r}")
        )
        for p in batch.items:
            try:
                p.answer(None, wrapped)
            except Exception:
                self._log_answer_failure()

    def _log_answer_failure(self) -> None:
        """Called in an except block: the traceback goes with the model's name."""
        log.exception("%s: answering a step failed (its waiter gets an error)", self.name)

    def _notify_if_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)


def _rows_of(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    """The batch's state slots (B,) and inputs (B, T, F) or (B, T), in item order."""
    items = batch.items
    if not batch.blocks:
        slots = np.fromiter([p.session.slot for p in items], np.int64, len(items))
        return slots, np.stack([p.x for p in items])
    if len(items) == 1:  # a block alone: its arrays as they are
        return items[0].slots, items[0].x  # type: ignore[union-attr]
    slots = np.concatenate(
        [p.slots if type(p) is PendingBlock else [p.session.slot] for p in items]
    ).astype(np.int64, copy=False)
    return slots, np.concatenate([p.x if type(p) is PendingBlock else p.x[None] for p in items])


def answer_failed(e: BaseException) -> RnnServeError:
    """The error a step's waiter gets when the step ran but its answer callback raised."""
    err = RnnServeError(f"the step ran but answering it failed: {e!r}")
    err.__cause__ = e
    return err
