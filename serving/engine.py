"""The serving core: one ``Engine`` behind every transport (our gRPC API, OIP, TorchServe handler).

Transports decode messages with ``serving.codec``, call these methods and map ``serving.errors``
exceptions with ``errors.grpc_status`` / ``errors.http_status``. Everything that decides behaviour
(validation, step ordering, batching, expiry) lives here, so every API answers alike.

A step's life: ``step()`` finds the session (expired/unknown are told apart), takes the session's
gate (calls on one session are serialized in arrival order), checks ``step_index``, hands the step
to its model's ``StepScheduler`` and waits for the batch. The scheduler stores the new state and
calls back ``_commit``, which records the reply (for retries), advances the index and releases the
gate. Because that bookkeeping hangs on the scheduler rather than on the caller, a client that
cancels mid-step leaves a consistent session: the step either happened (its reply is cached for a
retry of the same index) or it did not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from serving import codec
from serving.backends import BACKENDS, LoadedModel, initial_states, load_model
from serving.errors import (
    ArtifactError,
    InvalidInput,
    ModelNotFound,
    NotStreamable,
    PayloadTooLarge,
    RnnServeError,
    SessionNotFound,
    StepOutOfOrder,
    Unavailable,
    VersionNotFound,
)
from serving.manifest import Manifest, list_models, list_versions
from serving.predict_batcher import PredictBatcher, return_large_blocks_to_the_system
from serving.scheduler import StepCost, StepScheduler, answer_failed
from serving.sessions import Session, SessionStore, StatePool, acquire, release

log = logging.getLogger(__name__)

MAX_PREDICT_ROWS = 4096
MAX_PREDICT_STEPS = 262_144  # time steps over all rows of one Predict: 256 rows of 1,024
MAX_GENERATE_TOKENS = 4096


@dataclass(frozen=True)
class EngineConfig:
    store: Path
    backend: Literal["onnx", "torchscript"] = "onnx"
    threads: int = 1  # intra-op threads per backend call
    session_ttl_s: float = 600.0  # idle time before a session expires
    max_sessions: int = 100_000  # over all models; beyond: CapacityExhausted
    max_batch_size: int = 256  # steps of distinct sessions in one backend call
    max_queue_delay_ms: float = 0.0  # optional wait for a fuller batch; 0 = never wait
    max_steps_per_request: int = 1024  # time steps in one Step
    model_backends: Mapping[str, str] = field(default_factory=dict)  # per-model backend override
    sweep_interval_s: float | None = None  # expiry sweep period; default min(ttl / 2, 30 s)
    executor_threads: int | None = None  # worker threads for backend calls; default max(2, cpus)
    # a step batch predicted to compute within this runs on the event loop instead of the
    # executor (see serving.scheduler); 0 = always the executor
    inline_budget_us: float = 500.0

    def __post_init__(self) -> None:
        for name, kind in {"*": self.backend, **self.model_backends}.items():
            if kind not in BACKENDS:
                raise ValueError(f"backend for {name} must be one of {BACKENDS}, got {kind!r}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        at_least_one = {
            "max_steps_per_request": self.max_steps_per_request,
            "max_sessions": self.max_sessions,
            "max_batch_size": self.max_batch_size,
            "executor_threads": self.executor_threads or 1,
        }
        for name, value in at_least_one.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.session_ttl_s > 0:
            raise ValueError(f"session_ttl_s must be > 0, got {self.session_ttl_s}")
        if not self.inline_budget_us >= 0:
            raise ValueError(f"inline_budget_us must be >= 0, got {self.inline_budget_us}")
        if not self.max_queue_delay_ms >= 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.sweep_interval_s is not None and not self.sweep_interval_s > 0:
            # a zero or negative period would make the sweeper spin on the event loop
            raise ValueError(f"sweep_interval_s must be > 0, got {self.sweep_interval_s}")


@dataclass(frozen=True)
class SessionInfo:
    session_id: str  # >= 128 bits of randomness, url-safe text
    model: str
    version: int
    expires_at: float  # unix time of the idle deadline (refreshed by every call)
    next_step_index: int


@dataclass(slots=True)  # not frozen: a frozen __init__ sets each field through object.__setattr__,
class StepResult:  # and one is built per answered step (treat it as read-only all the same)
    step_index: int  # the index this reply answers
    y: np.ndarray  # (T, O) head outputs, one row per time step sent


@dataclass(slots=True)
class BlockResult:
    """``step_block``'s answer; row i belongs to the block's session i."""

    y: np.ndarray  # (N, T, O) head outputs, zeros where the entry failed; read-only: the sessions'
    # cached replies (for retries) are views of it
    step_indexes: list[int]  # N: the index each row answers (0 where the entry failed)
    errors: dict[int, Exception]  # position -> why that entry failed


@dataclass(frozen=True)
class Generated:
    """One generated token (char models) or forecast value (regression), already fed back."""

    step_index: int  # the session step that consumed it
    token: int | None  # char models
    value: np.ndarray | None  # regression: (F,) the value fed back as the next input
    y: np.ndarray  # (O,) the model's output after consuming it


@dataclass(frozen=True)
class StepCounters:
    """A streamable model version's step batches since start, over every API's steps."""

    batches: int  # backend calls
    rows: int  # session steps answered


CheckedStep = tuple[Session, "ModelRuntime", np.ndarray, int | None]  # as step_checked takes


class EngineObserver(Protocol):
    """Hooks for metrics; ``serving.metrics.Metrics`` implements them."""

    def on_batch(self, model: str, size: int) -> None: ...
    def on_step(self, model: str, seconds: float) -> None: ...
    def on_eviction(self, model: str, reason: str) -> None: ...


class _NoObserver:
    def on_batch(self, model: str, size: int) -> None:
        pass

    def on_step(self, model: str, seconds: float) -> None:
        pass

    def on_eviction(self, model: str, reason: str) -> None:
        pass


@dataclass
class ModelRuntime:
    """One loaded model version: its Predict batcher, and for streamable models its state pool
    and step scheduler."""

    loaded: LoadedModel
    pool: StatePool | None = None
    scheduler: StepScheduler | None = None
    predictor: PredictBatcher | None = None

    @property
    def manifest(self) -> Manifest:
        return self.loaded.manifest


class _StepGroupBuilder:
    """One model's claimed steps of a ``step_many`` call, gathered for one ``submit_many``."""

    __slots__ = ("indexes", "positions", "runtime", "sessions", "xs")

    def __init__(self, runtime: ModelRuntime) -> None:
        self.runtime = runtime
        self.positions: list[int] = []  # where each step's outcome goes
        self.sessions: list[Session] = []
        self.xs: list[np.ndarray] = []
        self.indexes: list[int] = []  # the step_index each step runs as


class _Block:
    """One ``step_block`` call: the claim loop, the scheduler's block, the gated stragglers."""

    __slots__ = (
        "cached",
        "claimed",
        "engine",
        "errors",
        "indexes",
        "parts",
        "positions",
        "rt",
        "sessions",
        "slow",
        "wants",
        "x",
    )

    def __init__(
        self,
        engine: Engine,
        rt: ModelRuntime,
        sessions: Sequence[Session],
        x: np.ndarray,
        wants: Sequence[int | None],
    ) -> None:
        self.engine, self.rt, self.sessions, self.x, self.wants = engine, rt, sessions, x, wants
        self.indexes = [0] * len(sessions)  # the index each entry runs as / answers
        self.errors: dict[int, Exception] = {}
        self.positions: list[int] = []  # of the claimed entries, in order
        self.claimed: list[Session] = []  # their sessions (whose gates this call holds)
        self.cached: list[tuple[int, StepResult]] = []  # retries answered from the cache
        self.slow: list[tuple[int, StepResult]] = []  # the gated path's answers
        self.parts: list[tuple[int, np.ndarray]] = []  # (first claimed row, y) as answered

    async def run(self) -> None:
        """Claim, queue the claimed rows, and wait for them and for the gated entries. The claims
        and the queueing happen before the first await, and the scheduler commits each row even
        if this call is cancelled, so no session is left holding its gate."""
        try:
            gated = self._claim_all()
        except BaseException:  # not expected; but a gate this call took must not stay taken
            for sess in self.claimed:
                release(sess)
            raise
        queued = self._submit() if self.claimed else None
        tasks = [asyncio.ensure_future(self._step_gated(pos)) for pos in gated]
        if tasks:
            await asyncio.gather(*([queued] if queued else []), *tasks)
        elif queued is not None:
            await queued

    def _claim_all(self) -> list[int]:
        """The claim loop (keep it lean); returns the entries for the gated path."""
        gated: list[int] = []
        positions, claimed, indexes = self.positions, self.claimed, self.indexes
        for pos, (sess, want) in enumerate(zip(self.sessions, self.wants, strict=True)):
            if sess.busy:  # in flight elsewhere, or claimed earlier in this block
                gated.append(pos)
                continue
            index = sess.next_index
            if (want is None or want == index) and not sess.closed:
                sess.busy = True  # the common case inline: free, in order, open
            else:  # a retry, a gap, a bad index, or closed
                outcome = self.engine._claim(sess, want)
                if type(outcome) is not int:
                    self._answered(pos, outcome)  # type: ignore[arg-type]
                    continue
                index = outcome
            indexes[pos] = index
            positions.append(pos)
            claimed.append(sess)
        return gated

    def _answered(self, pos: int, outcome: StepResult | Exception) -> None:
        """An entry answered without running: a cached reply, or an error."""
        if not isinstance(outcome, StepResult):
            self.errors[pos] = outcome
        elif len(outcome.y) != self.x.shape[1]:
            self.errors[pos] = _retry_of_another_length(outcome, self.x.shape[1])
        else:
            self.indexes[pos] = outcome.step_index
            self.cached.append((pos, outcome))

    def _submit(self) -> asyncio.Future[None] | None:
        """The claimed rows to the scheduler as one block; None (gates released) if refused."""
        x = self.x if len(self.claimed) == len(self.sessions) else self.x[self.positions]
        scheduler = self.rt.scheduler
        assert scheduler is not None
        try:
            return scheduler.submit_block(self.claimed, x, self._commit)
        except Exception as err:
            self._commit(0, len(self.claimed), None, err)
            return None

    def _commit(
        self, start: int, stop: int, y: np.ndarray | None, err: BaseException | None
    ) -> None:
        """Claimed rows start:stop answered (y (stop - start, T, O)) or failed: record each reply
        for retries, advance the index, release the gate. Runs on the loop, called by the
        scheduler even if the caller was cancelled meanwhile."""
        sessions = self.claimed[start:stop]
        if y is None:
            for sess in sessions:
                release(sess)
            for pos in self.positions[start:stop]:
                self.errors[pos] = err  # type: ignore[assignment]  # RnnServeErrors
            return
        try:
            for sess, row in zip(sessions, y, strict=True):
                index = sess.next_index  # still the claimed index: the gate was held throughout
                sess.last = StepResult(index, row)
                sess.next_index = index + 1
                if sess.waiters is None and not sess.closed:
                    sess.busy = False  # what release() does when nobody waits
                else:
                    release(sess)
        except BaseException:  # the scheduler fails the block; no gate may stay taken
            self._release_uncommitted(start, stop)
            raise
        self.parts.append((start, y))

    def _release_uncommitted(self, start: int, stop: int) -> None:
        """Release the gates of claimed rows start:stop whose commit did not happen (their index
        is still the claimed one); the committed ones were released as they were committed."""
        for sess, pos in zip(self.claimed[start:stop], self.positions[start:stop], strict=True):
            if sess.next_index == self.indexes[pos]:
                release(sess)

    async def _step_gated(self, pos: int) -> None:
        sess, want = self.sessions[pos], self.wants[pos]
        try:
            result = await self.engine.step_checked(sess, self.rt, self.x[pos], want)
        except Exception as err:
            self.errors[pos] = err
            return
        if len(result.y) != self.x.shape[1]:
            self.errors[pos] = _retry_of_another_length(result, self.x.shape[1])
            return
        self.indexes[pos] = result.step_index
        self.slow.append((pos, result))

    def result(self) -> BlockResult:
        n, (start, y) = len(self.sessions), (self.parts[0] if self.parts else (0, None))
        if y is not None and len(y) == n:  # every entry ran, in one batch: y as the model gave it
            return BlockResult(y, self.indexes, self.errors)
        out = np.zeros((n, self.x.shape[1], self.rt.manifest.output.size), np.float32)
        for start, y in self.parts:
            out[self.positions[start : start + len(y)]] = y
        for pos, answered in (*self.cached, *self.slow):
            out[pos] = answered.y
        indexes = self.indexes
        if self.errors:  # failed entries answer index 0
            indexes = [0 if pos in self.errors else i for pos, i in enumerate(indexes)]
        return BlockResult(out, indexes, self.errors)


class Engine:
    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        self.config = config
        self.observer: EngineObserver = observer or _NoObserver()
        self._runtimes: dict[str, ModelRuntime] = {}  # "name:version"
        self._latest: dict[str, int] = {}
        self._load_all()
        self.sessions = SessionStore(
            config.session_ttl_s, config.max_sessions, on_evict=self._evicted
        )
        threads = config.executor_threads or max(2, os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="rnnserve-infer")
        self._sweeper: asyncio.Task[None] | None = None
        self._inflight = 0  # predicts + steps not yet answered, for graceful stop
        self.stopping = False

    # ---- loading ---------------------------------------------------------------------------------
    def _load_all(self) -> None:
        store = Path(self.config.store)
        names = list_models(store)
        if not names:
            raise ArtifactError(f"no models in store {store} (expected <store>/<name>/<version>/)")
        for name in names:
            kind = self.config.model_backends.get(name, self.config.backend)
            for version in list_versions(store, name):
                loaded = load_model(store, name, version, kind, self.config.threads)  # type: ignore[arg-type]
                self._runtimes[loaded.key] = ModelRuntime(loaded)
                log.info("loaded %s (%s, %s)", loaded.key, kind, loaded.path)
            self._latest[name] = list_versions(store, name)[-1]

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        return_large_blocks_to_the_system()  # a Predict's memory comes back after it
        for key, rt in self._runtimes.items():
            rt.predictor = PredictBatcher(
                key, rt.loaded.backend, self._executor, cfg.max_batch_size
            )
            rt.predictor.start()
            if not rt.manifest.streamable:
                continue
            rt.pool = StatePool(rt.manifest.state)
            rt.scheduler = StepScheduler(
                key,
                rt.loaded.backend,
                rt.pool,
                self._executor,
                cfg.max_batch_size,
                cfg.max_queue_delay_ms / 1000.0,
                on_batch=lambda size, name=rt.manifest.name: self.observer.on_batch(name, size),
                inline_budget_s=cfg.inline_budget_us / 1e6,
            )
            rt.scheduler.cost = measure_step_cost(rt.loaded, cfg.max_batch_size)
            rt.scheduler.start()
        interval = cfg.sweep_interval_s or min(cfg.session_ttl_s / 2, 30.0)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(interval))

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new work, finish in-flight steps (up to ``grace_s``), then stop the schedulers."""
        self.stopping = True
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        runtimes = self._runtimes.values()
        schedulers = [rt.scheduler.stop() for rt in runtimes if rt.scheduler]
        schedulers += [rt.predictor.stop() for rt in runtimes if rt.predictor]
        await asyncio.wait_for(asyncio.gather(*schedulers), max(0.1, deadline - time.monotonic()))
        if self._sweeper:
            self._sweeper.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sessions.sweep()

    def _evicted(self, sess: Session, reason: str) -> None:
        self.observer.on_eviction(sess.key.rsplit(":", 1)[0], reason)

    # ---- models ----------------------------------------------------------------------------------
    def models(self) -> list[LoadedModel]:
        return [rt.loaded for rt in self._runtimes.values()]

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        return self._runtime(name, version).loaded

    def versions(self, name: str) -> list[int]:
        self._runtime(name)
        return sorted(
            rt.manifest.version for rt in self._runtimes.values() if rt.manifest.name == name
        )

    def live_sessions(self, name: str) -> int:
        return sum(
            self.sessions.count(k) for k, rt in self._runtimes.items() if rt.manifest.name == name
        )

    def step_counters(self, name: str, version: int | None = None) -> StepCounters | None:
        """None for a model without steps (bidirectional)."""
        s = self._runtime(name, version).scheduler
        if s is None:
            return None
        return StepCounters(s.batches, s.rows)

    def _runtime(self, name: str, version: int | None = None) -> ModelRuntime:
        if name not in self._latest:
            known = ", ".join(sorted(self._latest))
            raise ModelNotFound(f"unknown model {name!r}; this server has: {known}")
        version = version or self._latest[name]  # None or 0: latest
        rt = self._runtimes.get(f"{name}:{version}")
        if rt is None:
            have = ", ".join(str(v) for v in self.versions(name))
            raise VersionNotFound(f"model {name!r} has no version {version}; loaded: {have}")
        return rt

    # ---- sessions --------------------------------------------------------------------------------
    def open_session(
        self, model: str, version: int | None = None, session_id: str | None = None
    ) -> SessionInfo:
        self._check_running()
        rt = self._runtime(model, version)
        if not rt.manifest.streamable or rt.pool is None:
            raise self._not_streamable(rt.manifest)
        sess = self.sessions.open(rt.loaded.key, rt.pool, session_id)
        return self._info(sess)

    def session(self, session_id: str) -> SessionInfo:
        return self._info(self.sessions.get(session_id))

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

    def reset_session(self, session_id: str) -> SessionInfo:
        """State back to initial and index 0; waits for nothing: an in-flight step is not undone."""
        sess = self.sessions.get(session_id)
        if sess.busy:
            raise StepOutOfOrder(
                f"session {session_id!r} has a step in flight; reset after it answers",
                expected=sess.next_index,
            )
        sess.pool.reset(sess.slot)
        sess.next_index = 0
        sess.last = None
        return self._info(sess)

    def _info(self, sess: Session) -> SessionInfo:
        name, version = sess.key.rsplit(":", 1)
        return SessionInfo(sess.id, name, int(version), self.expires_at(sess), sess.next_index)

    def session_manifest(self, session_id: str) -> Manifest:
        return self._runtimes[self.sessions.get(session_id).key].manifest

    # ---- stepping --------------------------------------------------------------------------------
    def lookup(self, session_id: str) -> tuple[Session, ModelRuntime]:
        """The live session and its model (one store lookup; refreshes the idle deadline)."""
        sess = self.sessions.get(session_id)
        return sess, self._runtimes[sess.key]

    def lookup_many(
        self, session_ids: Sequence[str]
    ) -> list[tuple[Session, ModelRuntime] | RnnServeError]:
        """``lookup`` for many ids (one clock read): each id's session and model, or its error
        (SessionExpired / SessionNotFound), in order."""
        runtimes = self._runtimes
        return [
            found if type(found) is not Session else (found, runtimes[found.key])
            for found in self.sessions.get_many(session_ids)
        ]

    def runtime_of(self, sess: Session) -> ModelRuntime:
        """The model version a session (from ``sessions.get_many``) runs."""
        return self._runtimes[sess.key]

    def input_limit(self, m: Manifest) -> int:
        """Most time steps one step call may carry for this model."""
        return min(self.config.max_steps_per_request, m.input.max_steps)

    def expires_at(self, sess: Session) -> float:
        """Unix time of the session's idle deadline."""
        return time.time() + self.sessions.expires_in(sess)

    async def step(
        self, session_id: str, inputs: np.ndarray, step_index: int | None = None
    ) -> StepResult:
        self._check_running()
        sess, rt = self.lookup(session_id)
        x = self._checked_input(rt.manifest, inputs)
        return await self.step_checked(sess, rt, x, step_index)

    async def step_checked(
        self, sess: Session, rt: ModelRuntime, x: np.ndarray, step_index: int | None = None
    ) -> StepResult:
        """``step`` for a transport that found the session with ``lookup`` and already decoded
        ``x`` with ``serving.codec`` against ``rt.manifest`` and ``input_limit`` (so it is not
        validated a second time)."""
        self._check_running()
        started = time.perf_counter()
        if step_index is not None and step_index < 0:
            raise _negative_index(step_index)
        self._inflight += 1
        try:
            await acquire(sess)
            result = await self._step_owned(rt, sess, x, step_index)
        finally:
            self._inflight -= 1
        self.observer.on_step(rt.manifest.name, time.perf_counter() - started)
        return result

    async def step_many(self, steps: Sequence[CheckedStep]) -> list[StepResult | Exception]:
        """Steps of many sessions at once (StepMany): a result or the error per step, in order.

        Each step is (session, runtime, x, step_index) as ``step_checked`` takes them. A session
        that is free and appears once is gated, index-checked and queued right here, and each
        model's such steps go to its scheduler as one group (one wake-up, one future). A session
        that is busy, or appears again in the same call, takes the ordinary gated path in
        message order, so its steps run one after the other in that order and never share a
        batch. One step's error never fails the others.
        """
        if self.stopping:
            return [Unavailable("server is shutting down; retry on another instance")] * len(steps)
        started = time.perf_counter()
        outcomes: list[StepResult | Exception | None] = [None] * len(steps)
        groups: dict[int, _StepGroupBuilder] = {}  # id(runtime) -> its steps
        slow: list[asyncio.Future[None]] = []
        seen: set[int] = set()
        self._inflight += len(steps)
        try:
            for pos, (sess, rt, x, step_index) in enumerate(steps):
                key = id(sess)
                if sess.busy or key in seen:
                    slow.append(asyncio.ensure_future(self._step_into(outcomes, pos, steps[pos])))
                    continue
                seen.add(key)
                index = sess.next_index
                if (step_index is None or step_index == index) and not sess.closed:
                    sess.busy = True  # the common case inline: free, in order, open
                else:  # a retry, a gap, a bad index, or closed
                    outcome = self._claim(sess, step_index)
                    if not isinstance(outcome, int):
                        outcomes[pos] = outcome
                        continue
                    index = outcome
                group = groups.get(id(rt))
                if group is None:
                    group = groups[id(rt)] = _StepGroupBuilder(rt)
                group.positions.append(pos)
                group.sessions.append(sess)
                group.xs.append(x)
                group.indexes.append(index)
            queued = [self._submit_group(g, outcomes) for g in groups.values()]
            await asyncio.gather(*(q for q in queued if q is not None), *slow)
        finally:
            self._inflight -= len(steps)
        elapsed = time.perf_counter() - started
        for g in groups.values():
            self.observer.on_step(g.runtime.manifest.name, elapsed)
        return outcomes  # type: ignore[return-value]  # every slot is filled by now

    async def step_block(
        self,
        rt: ModelRuntime,
        sessions: Sequence[Session],
        x: np.ndarray,
        step_indexes: Sequence[int | None] | None = None,
    ) -> BlockResult:
        """One step for each of ``sessions`` (all of model ``rt``) with inputs ``x`` (N, T, F)
        float32 or (N, T) int64, already checked (``step_checked``'s contract, row by row), and
        ``step_indexes`` (N, or None for "the next one" everywhere).

        ``step_many`` for a packed block, with per-entry work cut to a few attribute operations:
        sessions that are free, in order and open are claimed in one loop and go to the scheduler
        as one block (x as it is, or one fancy index of it); their states are stored in one
        scatter, and one loop records each reply (for retries), advances the index and releases
        the gate. A retry of the last index answers from the cache; a session that is busy, or
        came earlier in this block and still holds the gate, takes the ordinary gated path in
        block order (as in ``step_many``). One entry's error never fails the others.
        """
        n = len(sessions)
        wants = [None] * n if step_indexes is None else step_indexes
        if len(x) != n or len(wants) != n:
            raise ValueError(f"{n} sessions, {len(x)} input rows, {len(wants)} step indexes")
        if self.stopping:
            gone = Unavailable("server is shutting down; retry on another instance")
            y = np.zeros((n, x.shape[1], rt.manifest.output.size), np.float32)  # (N, T, O)
            return BlockResult(y, [0] * n, dict.fromkeys(range(n), gone))
        started = time.perf_counter()
        self._inflight += n
        try:
            block = _Block(self, rt, sessions, x, wants)
            await block.run()
        finally:
            self._inflight -= n
        self.observer.on_step(rt.manifest.name, time.perf_counter() - started)
        return block.result()

    def _claim(self, sess: Session, step_index: int | None) -> int | StepResult | Exception:
        """Take a free session's gate and check the index: the index to run (gate kept), or the
        cached reply / the error (gate released)."""
        if step_index is not None and step_index < 0:
            return _negative_index(step_index)
        sess.busy = True  # free and not awaited: acquire() would return at once
        try:
            index = self._index_to_run(sess, step_index)
        except StepOutOfOrder as err:
            release(sess)
            return err
        if isinstance(index, StepResult):
            release(sess)
        elif sess.closed:
            release(sess)
            return self._gone(sess)
        return index

    def _submit_group(
        self, group: _StepGroupBuilder, outcomes: list[StepResult | Exception | None]
    ) -> asyncio.Future[list] | None:
        """Queue one model's claimed steps right now, not in a task: a caller cancelled before
        such a task started would leave their gates taken forever. Each step's outcome is written
        as it is committed; the returned future (None if nothing was queued) ends with the last."""
        sessions, indexes, positions = group.sessions, group.indexes, group.positions

        def commit(pos: int, y: np.ndarray | None, err: BaseException | None) -> None:
            """As _commit; the StepResult cached for retries is also this call's answer."""
            sess = sessions[pos]
            try:
                if err is None:
                    sess.last = outcomes[positions[pos]] = StepResult(indexes[pos], y)  # type: ignore[arg-type]
                    sess.next_index = indexes[pos] + 1
                else:
                    outcomes[positions[pos]] = err  # type: ignore[assignment]  # RnnServeErrors
            except BaseException as e:  # the step's answer is this error, never a None
                outcomes[positions[pos]] = answer_failed(e)
                raise
            finally:  # a gate left taken would hang every later call of the session
                release(sess)

        assert group.runtime.scheduler is not None
        try:
            return group.runtime.scheduler.submit_many(sessions, group.xs, commit)
        except Exception as err:
            for pos, sess in zip(positions, sessions, strict=True):
                release(sess)
                outcomes[pos] = err
            return None

    async def _step_into(
        self, outcomes: list[StepResult | Exception | None], pos: int, step: CheckedStep
    ) -> None:
        sess, rt, x, step_index = step
        try:
            outcomes[pos] = await self.step_checked(sess, rt, x, step_index)
        except Exception as err:
            outcomes[pos] = err

    async def _step_owned(
        self, rt: ModelRuntime, sess: Session, x: np.ndarray, step_index: int | None
    ) -> StepResult:
        """Runs with the session's gate held; the gate is released when the step completes."""
        try:
            index = self._index_to_run(sess, step_index)
            if isinstance(index, StepResult):
                release(sess)
                return index
            if sess.closed:
                raise self._gone(sess)
            assert rt.scheduler is not None
            # the scheduler calls _commit when the step is answered, even if this caller is
            # cancelled meanwhile (awaiting fut then cancels fut, never the step)
            fut = rt.scheduler.submit(sess, x, functools.partial(self._commit, sess, index))
        except BaseException:
            release(sess)
            raise
        return StepResult(index, await fut)

    def _index_to_run(self, sess: Session, step_index: int | None) -> int | StepResult:
        """The index to run now, or the cached reply for a retry of the last step."""
        expected = sess.next_index
        if step_index is None or step_index == expected:
            return expected
        if step_index == expected - 1 and sess.last is not None:
            return sess.last
        raise StepOutOfOrder(
            f"step_index {step_index} is out of order for session {sess.id!r}: expected "
            f"{expected}" + (f" (or {expected - 1} to retry the last step)" if expected else ""),
            expected=expected,
        )

    @staticmethod
    def _commit(sess: Session, index: int, y: np.ndarray | None, err: BaseException | None) -> None:
        try:
            if err is None:
                sess.last = StepResult(index, y)
                sess.next_index = index + 1
        finally:  # a gate left taken would hang every later call of the session
            release(sess)

    @staticmethod
    def _gone(sess: Session) -> RnnServeError:
        return SessionNotFound(f"session {sess.id!r} was closed while this call waited")

    def _checked_input(self, m: Manifest, x: np.ndarray) -> np.ndarray:
        """Guards the batch: one malformed row must fail alone, never the batch it would join."""
        limit = self.input_limit(m)
        x = np.asarray(x)
        if m.input.kind == "tokens":
            if x.ndim != 1 or x.dtype.kind not in "iu":
                raise InvalidInput(
                    f"{m.name} takes token ids shaped (T,), got {x.dtype}{list(x.shape)}", "tokens"
                )
            return codec.decode_tokens(m, x, limit)
        if x.ndim != 2 or x.dtype.kind != "f":
            raise InvalidInput(
                f"{m.name} takes float features shaped (T, F), got {x.dtype}{list(x.shape)}",
                "inputs",
            )
        return codec.decode_features(m, x, max_steps=limit)

    # ---- stateless -------------------------------------------------------------------------------
    async def predict(self, model: str, version: int | None, rows: list[np.ndarray]) -> np.ndarray:
        """Whole sequences through the sequence graph (every model) → y (B, O)."""
        self._check_running()
        rt = self._runtime(model, version)
        m = rt.manifest
        check_predict_rows(len(rows))
        checked = [self._checked_input(m, r) for r in rows]
        check_predict_steps(sum(len(r) for r in checked))
        assert rt.predictor is not None, "Engine.start() was not awaited"
        self._inflight += 1
        try:
            # concurrent Predicts of this model share one sequence-graph call
            return await rt.predictor.submit(checked)
        finally:
            self._inflight -= 1

    # ---- generation ------------------------------------------------------------------------------
    async def generate(
        self,
        session_id: str,
        prompt: np.ndarray | None = None,
        max_tokens: int = 32,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[Generated]:
        """Char models: sample tokens; regression: feed each prediction back as the next input.

        Every generated token/value is stepped through the session, so afterwards the session's
        state has consumed the prompt and everything generated, and Steps continue from there.
        """
        m = self.session_manifest(session_id)
        check_generate(m, max_tokens, temperature, top_k)
        if prompt is not None:
            y = (await self.step(session_id, prompt)).y[-1]
        else:
            y = self._last_output(session_id)

        def step(x: np.ndarray) -> Awaitable[StepResult]:
            return self.step(session_id, x)

        async for g in rollout(m, step, y, max_tokens, temperature, top_k, seed):
            yield g

    def _last_output(self, session_id: str) -> np.ndarray:
        sess = self.sessions.get(session_id)
        if sess.last is None:
            raise InvalidInput("a fresh session needs a prompt to generate from", field="prompt")
        return sess.last.y[-1]

    # ---- helpers ---------------------------------------------------------------------------------
    def _check_running(self) -> None:
        if self.stopping:
            raise Unavailable("server is shutting down; retry on another instance")

    @staticmethod
    def _not_streamable(m: Manifest) -> NotStreamable:
        return NotStreamable(
            f"{m.name} is not streamable (it reads whole sequences, e.g. bidirectional): "
            "use Predict with the whole sequence instead of sessions/Step"
        )


def measure_step_cost(
    loaded: LoadedModel, max_batch: int, rows: int = 32, steps: int = 16
) -> StepCost:
    """Time the step graph at the corners (1, 1), (rows, 1), (1, steps) and (rows, steps) of
    batch × time steps, so a row along the batch and a step along the time axis are priced
    apart: a long step of one session costs far more than a wide step of many sessions with as
    many rows × steps (priced alike, a 1 × 256 call was predicted at about half its cost).
    ``rows`` is capped at ``max_batch`` and ``steps`` at the model's input limit; the slopes are
    measured even when batches stay at 1 (a 1,024-step call must not be priced as one step and
    run on the event loop). Each timing follows a warm-up call, which also spares the first real
    request the backend's first-call costs."""
    rows = max(1, min(rows, max_batch))
    steps = max(1, min(steps, loaded.manifest.input.max_steps))
    one_s = best_step_time(loaded, 1, 1)
    steps_s = best_step_time(loaded, 1, steps) if steps > 1 else one_s
    if rows == 1:  # the batch never grows: the row terms are never used
        return StepCost.from_timings(1, steps, one_s, one_s, steps_s, steps_s)
    rows_s = best_step_time(loaded, rows, 1)
    both_s = best_step_time(loaded, rows, steps) if steps > 1 else rows_s
    return StepCost.from_timings(rows, steps, one_s, rows_s, steps_s, both_s)


def best_step_time(
    loaded: LoadedModel, batch: int, steps: int, repeats: int | None = None
) -> float:
    """The fastest of a few step calls at (batch, steps) after a warm-up call. Noise on a shared
    machine only adds time, and a slow (1, 1) call would bend every slope fitted from it, so the
    cheap edges (well under a millisecond) get 7 tries and the (rows, steps) corner 3."""
    m = loaded.manifest
    if repeats is None:
        repeats = 7 if batch == 1 or steps == 1 else 3
    if m.input.kind == "tokens":
        x = np.zeros((batch, steps), dtype=np.int64)  # (B, T)
    else:
        x = np.zeros((batch, steps, m.input.features or 1), dtype=np.float32)  # (B, T, F)
    states = initial_states(m, batch)
    loaded.backend.step(x, states)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loaded.backend.step(x, states)
        times.append(time.perf_counter() - started)
    return min(times)


def _retry_of_another_length(cached: StepResult, steps: int) -> InvalidInput:
    """A block row can only be filled by a reply of the block's own time length."""
    return InvalidInput(
        f"step_index {cached.step_index} was answered with {len(cached.y)} time steps; "
        f"this block carries {steps}",
        field="steps",
    )


def _negative_index(step_index: int) -> InvalidInput:
    return InvalidInput(f"step_index must be >= 0, got {step_index}", field="step_index")


def check_predict_rows(count: int) -> None:
    """How many sequences one Predict may carry; transports call it before decoding any."""
    if not count:
        raise InvalidInput("Predict needs at least one input sequence", field="inputs")
    if count > MAX_PREDICT_ROWS:
        raise PayloadTooLarge(
            f"{count} sequences in one Predict; at most {MAX_PREDICT_ROWS}", "inputs"
        )


def check_predict_steps(total: int) -> None:
    """All rows of one Predict together: their compute (and the batcher's calls) is bounded
    before any of it runs; a row's own length is bounded by the model's max_steps."""
    if total > MAX_PREDICT_STEPS:
        raise PayloadTooLarge(
            f"{total} time steps over the sequences of one Predict; at most {MAX_PREDICT_STEPS}",
            "inputs",
        )


def check_generate(m: Manifest, max_tokens: int, temperature: float, top_k: int) -> None:
    """Why Generate cannot run on this model with these parameters, if it cannot."""
    if m.output.kind == "classification":
        raise InvalidInput(f"{m.name} is a classifier; Generate needs a char or regression model")
    if m.output.kind == "regression" and m.output.size != (m.input.features or 0):
        raise InvalidInput(
            f"{m.name} outputs {m.output.size} values for {m.input.features} input features, "
            "so its predictions cannot be fed back"
        )
    if not 1 <= max_tokens <= MAX_GENERATE_TOKENS:
        raise InvalidInput(
            f"max_tokens must be in 1..{MAX_GENERATE_TOKENS}, got {max_tokens}", "max_tokens"
        )
    if not (np.isfinite(temperature) and temperature >= 0):
        raise InvalidInput(f"temperature must be finite and >= 0, got {temperature}", "temperature")
    if top_k < 0 or top_k > m.output.size:
        raise InvalidInput(f"top_k must be in 0..{m.output.size}, got {top_k}", "top_k")


async def rollout(
    m: Manifest,
    step: Callable[[np.ndarray], Awaitable[StepResult]],
    y: np.ndarray,
    max_tokens: int,
    temperature: float,
    top_k: int,
    seed: int | None,
) -> AsyncIterator[Generated]:
    """Generate's loop on any session: from the head output ``y`` (O,) of the session's last step,
    char models sample the next token and regression models feed their prediction back, each
    stepped through ``step`` (so the session's state consumes everything generated)."""
    rng = np.random.default_rng(seed)
    for _ in range(max_tokens):
        if m.output.kind == "next_token":
            token = sample_token(codec.probabilities(m, y), temperature, top_k, rng)
            res = await step(np.array([token], dtype=np.int64))
            yield Generated(res.step_index, token, None, res.y[0])
        else:
            value = y.astype(np.float32).reshape(-1)  # (F,)
            res = await step(value.reshape(1, -1))
            yield Generated(res.step_index, None, value, res.y[0])
        y = res.y[0]


def sample_token(p: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """A token id from probabilities ``p`` (K,): temperature 0 = argmax, top_k 0 = all tokens."""
    if temperature == 0:
        return int(np.argmax(p))
    log_p = np.log(np.maximum(p.astype(np.float64), 1e-30))
    # shifted before dividing so the best logit is exactly 0: a tiny temperature then sends the
    # others to -inf instead of making every logit -inf (and the probabilities NaN)
    with np.errstate(over="ignore"):
        logits = (log_p - log_p.max()) / temperature
    if 0 < top_k < len(p):
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    z = np.exp(logits)
    return int(rng.choice(len(p), p=z / z.sum()))
