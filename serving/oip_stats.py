"""Per-model request counts and times for Triton's ModelStatistics, kept by the OIP servicer.

Each OIP inference request is timed in phases by a ``RequestClock``: decoding the inputs
(compute_input), the engine call, building the reply (compute_output). Within the engine call the
step scheduler tells the clock (``serving.scheduler.step_timing``) how long the request's step
waited for its batch (queue) and how long that batch ran (compute_infer); a request of several
rows takes its slowest row's. The request is counted once, as a success or a failure, under the
model version it resolved to; a request naming an unknown model counts nowhere (as in Triton).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    """A count and its total time: Triton's StatisticDuration."""

    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, round(seconds * 1e9))


@dataclass
class ModelRequestStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # rows: a request of batch 4 counts 4
    last_inference_ms: int = 0


class RequestClock:
    """One request's phase boundaries (perf_counter seconds) and the model it resolved to."""

    __slots__ = ("batch_s", "computed", "decoded", "model", "queued_s", "rows", "started")

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.model: tuple[str, int] | None = None
        self.rows = 0
        self.decoded = self.computed = 0.0
        self.queued_s: float | None = None  # None: no step scheduler timed it (whole sequences)
        self.batch_s = 0.0

    def timed(self, queued_s: float, computed_s: float) -> None:
        """``serving.scheduler.StepTiming``: one of the request's steps was answered."""
        self.queued_s = max(self.queued_s or 0.0, queued_s)
        self.batch_s = max(self.batch_s, computed_s)

    def resolved(self, name: str, version: int) -> None:
        self.model = (name, version)

    def inputs_decoded(self, rows: int) -> None:
        self.rows = rows
        self.decoded = time.perf_counter()

    def engine_answered(self) -> None:
        self.computed = time.perf_counter()


class RequestStatistics:
    """Totals per (model, version) since the server started (updated and read on the loop)."""

    def __init__(self) -> None:
        self._by_model: dict[tuple[str, int], ModelRequestStats] = {}

    def succeeded(self, clock: RequestClock) -> None:
        if clock.model is None:
            return
        done = time.perf_counter()
        s = self._stats(clock.model)
        s.success.add(done - clock.started)
        s.compute_input.add(clock.decoded - clock.started)
        if clock.queued_s is None:  # the whole-sequence batcher: its queue is not told apart
            s.queue.add(0.0)
            s.compute_infer.add(clock.computed - clock.decoded)
        else:
            s.queue.add(clock.queued_s)
            s.compute_infer.add(clock.batch_s)
        s.compute_output.add(done - clock.computed)
        s.inference_count += clock.rows
        s.last_inference_ms = int(time.time() * 1000)

    def failed(self, clock: RequestClock) -> None:
        if clock.model is not None:
            self._stats(clock.model).fail.add(time.perf_counter() - clock.started)

    def snapshot(self, name: str, version: int) -> ModelRequestStats:
        """A copy (zeros for a model never asked)."""
        return copy.deepcopy(self._by_model.get((name, version)) or ModelRequestStats())

    def _stats(self, key: tuple[str, int]) -> ModelRequestStats:
        s = self._by_model.get(key)
        if s is None:
            s = self._by_model[key] = ModelRequestStats()
        return s
