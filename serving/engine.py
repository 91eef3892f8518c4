"""The models behind every transport: ``Engine`` loads each version of each model in the store
(verifying its artifacts), runs stateless Predicts through a per-version batcher, and holds the
checks and the generation loop the transports share.

Sessions and steps are not here: the native core (``serving/core``) owns them and calls each
model's ``backend.step`` once per batch. Transports decode with ``serving.codec`` and map
``serving.errors`` exceptions with ``errors.grpc_status`` / ``errors.http_status``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from serving import codec
from serving.backends import BACKENDS, LoadedModel, load_model
from serving.errors import (
    ArtifactError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    Unavailable,
    VersionNotFound,
)
from serving.manifest import Manifest, list_models, list_versions
from serving.predict_batcher import PredictBatcher, return_large_blocks_to_the_system

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
    executor_threads: int | None = None  # worker threads for Predict calls; default max(2, cpus)

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
        if not self.max_queue_delay_ms >= 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")


@dataclass(slots=True)
class StepResult:
    """One answered step of a session, as the core returns it."""

    step_index: int  # the index this reply answers
    y: np.ndarray  # (T, O) head outputs, one row per time step sent


@dataclass(frozen=True)
class Generated:
    """One generated token (char models) or forecast value (regression), already fed back."""

    step_index: int  # the session step that consumed it
    token: int | None  # char models
    value: np.ndarray | None  # regression: (F,) the value fed back as the next input
    y: np.ndarray  # (O,) the model's output after consuming it


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._models: dict[str, LoadedModel] = {}  # "name:version"
        self._predictors: dict[str, PredictBatcher] = {}
        self._ready: set[str] = set()  # keys new work may use (the rest are unloading)
        self._latest: dict[str, int] = {}  # name -> newest ready version
        self._started = False
        self._load_all()
        threads = config.executor_threads or max(2, os.cpu_count() or 1)
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="rnnserve-predict")
        self._inflight = 0  # Predicts not yet answered, for graceful stop
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
                self._models[loaded.key] = loaded
                self._ready.add(loaded.key)
                log.info("loaded %s (%s, %s)", loaded.key, kind, loaded.path)
        self._refresh_latest()

    # ---- versions loaded, retired and removed while serving (serving.core.model_control) ------
    def add(self, loaded: LoadedModel) -> None:
        """A version loaded while serving: ready for new work at once."""
        self._models[loaded.key] = loaded
        self._ready.add(loaded.key)
        if self._started:
            self._start_predictor(loaded)
        self._refresh_latest()

    def set_ready(self, name: str, version: int, ready: bool) -> None:
        """Not ready: unloading, no new work; what runs on it (sessions) finishes."""
        key = self.model(name, version).key
        (self._ready.add if ready else self._ready.discard)(key)
        self._refresh_latest()

    async def remove(self, name: str, version: int) -> None:
        """Forget an unloaded version; its backend is freed with the last reference."""
        key = f"{name}:{version}"
        self._ready.discard(key)
        self._models.pop(key, None)
        self._refresh_latest()
        predictor = self._predictors.pop(key, None)
        if predictor is not None:
            await predictor.stop()

    def _refresh_latest(self) -> None:
        self._latest = {}
        for key in self._ready:
            m = self._models[key].manifest
            self._latest[m.name] = max(self._latest.get(m.name, 0), m.version)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        return_large_blocks_to_the_system()  # a Predict's memory comes back after it
        self._started = True
        for loaded in self._models.values():
            self._start_predictor(loaded)

    def _start_predictor(self, loaded: LoadedModel) -> None:
        predictor = PredictBatcher(
            loaded.key, loaded.backend, self._executor, self.config.max_batch_size
        )
        predictor.start()
        self._predictors[loaded.key] = predictor

    async def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new Predicts, finish in-flight ones (up to ``grace_s``), then stop."""
        self.stopping = True
        deadline = time.monotonic() + grace_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stopping = [p.stop() for p in self._predictors.values()]
        await asyncio.wait_for(asyncio.gather(*stopping), max(0.1, deadline - time.monotonic()))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- models ----------------------------------------------------------------------------------
    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    def model(self, name: str, version: int | None = None) -> LoadedModel:
        """None or 0: the newest ready version; a named version: any loaded one (an unloading
        version still serves its live sessions; new work checks ``ready_model``)."""
        have = self.versions(name)
        if not version:
            if name not in self._latest:
                listed = ", ".join(f"{v} (unloading)" for v in have)
                raise VersionNotFound(f"model {name!r} has no ready version; loaded: {listed}")
            version = self._latest[name]
        loaded = self._models.get(f"{name}:{version}")
        if loaded is None:
            raise VersionNotFound(
                f"model {name!r} has no version {version}; loaded: {', '.join(map(str, have))}"
            )
        return loaded

    def ready_model(self, name: str, version: int | None = None) -> LoadedModel:
        """``model()`` for new work (sessions, stateless calls): the version must be ready."""
        loaded = self.model(name, version)
        if loaded.key not in self._ready:
            newest = self._latest.get(name)
            instead = f"the newest ready one is {newest}" if newest else "no version of it is ready"
            raise VersionNotFound(
                f"model {name!r} version {version} is unloading: it takes no new sessions or "
                f"stateless calls; {instead}"
            )
        return loaded

    def is_ready(self, name: str, version: int) -> bool:
        return f"{name}:{version}" in self._ready

    def versions(self, name: str) -> list[int]:
        """Every loaded version of ``name`` (ready or unloading); ModelNotFound when none."""
        found = self.loaded_versions(name)
        if not found:
            known = ", ".join(self.model_names())
            raise ModelNotFound(f"unknown model {name!r}; this server has: {known}")
        return found

    def loaded_versions(self, name: str) -> list[int]:
        return sorted(m.manifest.version for m in self._models.values() if m.manifest.name == name)

    def model_names(self) -> list[str]:
        return sorted({m.manifest.name for m in self._models.values()})

    def input_limit(self, m: Manifest) -> int:
        """Most time steps one step call may carry for this model."""
        return min(self.config.max_steps_per_request, m.input.max_steps)

    def checked_input(self, m: Manifest, x: np.ndarray) -> np.ndarray:
        """One sequence as the model takes it, or InvalidInput naming what is wrong."""
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
        if self.stopping:
            raise Unavailable("server is shutting down; retry on another instance")
        loaded = self.ready_model(model, version)
        m = loaded.manifest
        check_predict_rows(len(rows))
        checked = [self.checked_input(m, r) for r in rows]
        check_predict_steps(sum(len(r) for r in checked))
        predictor = self._predictors.get(loaded.key)
        assert predictor is not None, "Engine.start() was not awaited"
        self._inflight += 1
        try:
            # concurrent Predicts of this model share one sequence-graph call
            return await predictor.submit(checked)
        finally:
            self._inflight -= 1


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
