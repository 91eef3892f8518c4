"""StepMany's packed form: one model's sessions as one block of raw tensors.

A ``PackedSteps`` message carries N session ids, optional step indexes and the inputs of all N
sessions as one (N, T, F) float32 little-endian buffer (or N*T token ids); the ``PackedResults``
reply carries (N, T, O) head outputs and, for classifiers and char models, (N, T, K) probabilities
as raw bytes plus the argmax. Decoding, validation and the reply are NumPy operations on the whole
block, so the per-entry Python left is the session lookup and the engine's own bookkeeping.

Message-level mistakes (sizes, too many entries, too many time steps, unknown or non-streamable
model, ``steps`` and ``packed`` both set) raise, which ends the StepMany stream with that status,
as the message-level errors of the ``steps`` form do. Per-entry mistakes (unknown/expired session,
a session of another model, NaN/Inf or a token outside the vocabulary in that entry's rows, an
out-of-order step index) fail that entry alone, reported by position; the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.engine import CheckedStep, Engine, StepResult
from serving.errors import InvalidInput, NotStreamable, PayloadTooLarge
from serving.grpc_api import MAX_STEPMANY_ENTRIES, own_session
from serving.manifest import Manifest

FLOAT32_LE = np.dtype("<f4")

Outcome = StepResult | Exception | None
EntryErrorFn = Callable[[Exception], pb.Error]  # counts the error and builds its message


@dataclass(frozen=True)
class Block:
    """A ``PackedSteps`` message decoded against its model and checked at message level."""

    m: Manifest  # the model's latest version: what sizes the block is read with
    session_ids: Sequence[str]  # N
    step_indexes: Sequence[int] | None  # N, or None for "the next one"
    x: np.ndarray  # (N, T, F) float32 or (N, T) int64
    bad: np.ndarray  # (N,) bool: the entry's rows hold NaN/Inf or a token outside the vocab

    @property
    def steps(self) -> int:
        return self.x.shape[1]


def decode_block(engine: Engine, message: pb.StepManyRequest) -> Block:
    """The message's block, or the message-level error (``InvalidInput`` and friends)."""
    packed = message.packed
    if len(message.steps):
        raise InvalidInput(
            "a StepMany message carries `steps` or `packed`, not both", field="packed"
        )
    n = len(packed.session_ids)
    if n > MAX_STEPMANY_ENTRIES:
        raise PayloadTooLarge(
            f"{n} sessions in one packed StepMany block; at most {MAX_STEPMANY_ENTRIES}",
            field="packed.session_ids",
        )
    m = engine.model(packed.model).manifest  # unknown model: NOT_FOUND
    if not m.streamable:
        raise NotStreamable(
            f"{m.name} is not streamable (it reads whole sequences, e.g. bidirectional): "
            "use Predict with the whole sequence instead of sessions/StepMany"
        )
    indexes = packed.step_indexes
    if len(indexes) not in (0, n):
        raise InvalidInput(
            f"{len(indexes)} step_indexes for {n} sessions: send none or one per session",
            field="packed.step_indexes",
        )
    steps = packed.steps or 1
    limit = engine.input_limit(m)
    if steps > limit:
        raise InvalidInput(
            f"{steps} time steps per session; {m.name} accepts at most {limit}",
            field="packed.steps",
        )
    if m.input.kind == "tokens":
        x, bad = _tokens(m, packed, n, steps)
    else:
        x, bad = _features(m, packed, n, steps)
    return Block(m, packed.session_ids, indexes if len(indexes) else None, x, bad)


def _features(m: Manifest, packed: pb.PackedSteps, n: int, steps: int) -> tuple[np.ndarray, ...]:
    f = int(m.input.features or 0)
    if len(packed.tokens):
        raise InvalidInput(f"{m.name} takes features, not tokens", field="packed.tokens")
    expected = n * steps * f * FLOAT32_LE.itemsize
    if len(packed.features) != expected:
        raise InvalidInput(
            f"packed.features holds {len(packed.features)} bytes; {n} sessions x {steps} steps x "
            f"{f} features of float32 are {expected} bytes",
            field="packed.features",
        )
    x = np.frombuffer(packed.features, FLOAT32_LE).reshape(n, steps, f)  # (N, T, F)
    bad = ~np.isfinite(x).all(axis=(1, 2))  # (N,)
    return x, bad


def _tokens(m: Manifest, packed: pb.PackedSteps, n: int, steps: int) -> tuple[np.ndarray, ...]:
    if packed.features:
        raise InvalidInput(f"{m.name} takes tokens, not features", field="packed.features")
    if len(packed.tokens) != n * steps:
        raise InvalidInput(
            f"packed.tokens holds {len(packed.tokens)} ids; {n} sessions x {steps} steps are "
            f"{n * steps}",
            field="packed.tokens",
        )
    x = np.fromiter(packed.tokens, np.int64, n * steps).reshape(n, steps)  # (N, T)
    vocab = len(m.input.vocab or [])
    bad = ((x < 0) | (x >= vocab)).any(axis=1)  # (N,)
    return x, bad


def model_problem(block: Block, m: Manifest) -> InvalidInput | None:
    """Why no session of model version ``m`` can run in this block, if none can."""
    if m.name != block.m.name:
        return InvalidInput(
            f"the session belongs to model {m.name!r}, not {block.m.name!r}",
            field="packed.session_ids",
        )
    if m.input != block.m.input or m.output != block.m.output:
        return InvalidInput(
            f"the session runs {m.name} version {m.version}, whose inputs/outputs differ from "
            f"version {block.m.version}'s; step it with `steps`",
            field="packed.session_ids",
        )
    return None


def row_problem(block: Block, pos: int) -> InvalidInput:
    """The error of an entry whose rows ``block.bad`` marks."""
    if block.m.input.kind == "tokens":
        vocab = len(block.m.input.vocab or [])
        return InvalidInput(
            f"entry {pos}: a token is outside the vocabulary [0, {vocab})", field="packed.tokens"
        )
    return InvalidInput(f"entry {pos}: inputs contain NaN or Inf", field="packed.features")


async def step_packed(
    engine: Engine, message: pb.StepManyRequest, entry_error: EntryErrorFn
) -> pb.StepManyResponse:
    """One packed StepMany message → its reply: every valid entry through one
    ``Engine.step_many``, the outputs back as (N, T, ...) buffers."""
    block = decode_block(engine, message)
    n = len(block.session_ids)
    outcomes: list[Outcome] = [None] * n
    checked: list[CheckedStep] = []
    where: list[int] = []  # position of each checked step in the block
    bad = block.bad if block.bad.any() else None
    indexes = [None] * n if block.step_indexes is None else list(block.step_indexes)
    lookup, x = engine.lookup, block.x
    last_rt, model_error = None, None  # the sessions of a block almost always share a runtime
    for pos, session_id in enumerate(block.session_ids):  # the per-entry loop: keep it lean
        try:
            sess, rt = lookup(own_session(session_id))
        except Exception as err:
            outcomes[pos] = err
            continue
        if rt is not last_rt:
            last_rt, model_error = rt, model_problem(block, rt.manifest)
        problem = model_error
        if problem is None and bad is not None and bad[pos]:
            problem = row_problem(block, pos)
        if problem is not None:
            outcomes[pos] = problem
            continue
        checked.append((sess, rt, x[pos], indexes[pos]))
        where.append(pos)
    # every lookup pushed its session's deadline to now + TTL: one answers for all of them
    expires_at = engine.expires_at(checked[0][0]) if checked else 0.0
    for pos, outcome in zip(where, await engine.step_many(checked), strict=True):
        outcomes[pos] = outcome
    return pb.StepManyResponse(packed=packed_results(block, outcomes, entry_error, expires_at))


def packed_results(
    block: Block, outcomes: Sequence[Outcome], entry_error: EntryErrorFn, expires_at: float
) -> pb.PackedResults:
    """The reply: answered rows stacked into (N, T, O) (zeros where an entry failed)."""
    m, n, steps = block.m, len(outcomes), block.steps
    answered: list[int] = []
    rows: list[np.ndarray] = []  # each (T, O)
    for pos, o in enumerate(outcomes):
        if type(o) is StepResult and len(o.y) == steps:  # see _failure for other lengths
            answered.append(pos)
            rows.append(o.y)
    shape = (len(answered), steps, m.output.size)
    # concatenate, then reshape: np.stack costs three times as much for many small arrays
    got = np.concatenate(rows).reshape(shape) if rows else np.zeros(shape)  # (A, T, O)
    if len(answered) == n:
        y = got.astype(FLOAT32_LE, copy=False)  # (N, T, O)
        step_indexes = [o.step_index for o in outcomes]  # type: ignore[union-attr]
    else:
        y = np.zeros((n, *shape[1:]), FLOAT32_LE)  # (N, T, O): zeros where an entry failed
        y[answered] = got
        step_indexes = [0] * n
        for pos in answered:
            step_indexes[pos] = outcomes[pos].step_index  # type: ignore[union-attr]
    errors = []
    if len(answered) < n:
        done = set(answered)
        errors = [
            pb.EntryError(position=pos, error=entry_error(_failure(o, steps)))
            for pos, o in enumerate(outcomes)
            if pos not in done
        ]
    reply = pb.PackedResults(
        step_indexes=step_indexes, raw=y.tobytes(), errors=errors, expires_at=expires_at
    )
    if m.output.kind != "regression":
        p = codec.probabilities(m, y).astype(FLOAT32_LE, copy=False)  # (N, T, K)
        if len(answered) < n:
            p[np.isin(np.arange(n), answered, invert=True)] = 0.0
        reply.probabilities = p.tobytes()
        reply.index.extend(p.argmax(axis=-1).ravel().tolist())  # (N * T,)
    return reply


def _failure(outcome: Outcome, steps: int) -> Exception:
    """An entry's error; a reply that does not fit the block is one too."""
    if isinstance(outcome, StepResult):
        # a retry answered from the cache of a step that carried another number of time steps
        return InvalidInput(
            f"step_index {outcome.step_index} was answered with {len(outcome.y)} time steps; "
            f"this block carries {steps}",
            field="packed.steps",
        )
    assert outcome is not None, "every entry has an outcome"
    return outcome
