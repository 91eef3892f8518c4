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

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.engine import BlockResult, Engine, ModelRuntime
from serving.errors import InvalidInput, NotStreamable, PayloadTooLarge
from serving.grpc_api import (
    DEFAULT_MAX_REPLY_BYTES,
    ENTRY_ERROR_BYTES,
    MAX_STEPMANY_ENTRIES,
    check_reply_bytes,
    own_session_ids,
)
from serving.manifest import Manifest
from serving.sessions import Session

FLOAT32_LE = np.dtype("<f4")

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
    # plain lists: every read of a protobuf repeated field builds a new Python object (a str
    # whose hash is not cached yet), which made the session lookups three times as slow
    ids, wants = list(packed.session_ids), list(indexes) if len(indexes) else None
    return Block(m, ids, wants, x, bad)


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


class _Group:
    """The block's entries whose sessions run one model version (almost always all of them)."""

    __slots__ = ("key", "positions", "problem", "rt", "sessions")

    def __init__(self, rt: ModelRuntime, problem: InvalidInput | None) -> None:
        self.rt = rt
        self.key = rt.loaded.key  # "name:version", as its sessions carry it
        self.problem = problem  # why none of them can run here, if so
        self.positions: list[int] = []
        self.sessions: list[Session] = []


async def step_packed(
    engine: Engine,
    message: pb.StepManyRequest,
    entry_error: EntryErrorFn,
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
) -> pb.StepManyResponse:
    """One packed StepMany message → its reply: the sessions looked up at once, each model
    version's valid entries through one ``Engine.step_block``, the outputs back as (N, T, ...)
    buffers. A reply that could exceed ``max_reply_bytes`` is refused before any step runs."""
    block = decode_block(engine, message)
    check_reply_bytes(packed_reply_bytes(block), max_reply_bytes)
    errors: dict[int, Exception] = {}
    groups = _grouped(engine, block, errors)
    if len(groups) == 1:  # the common case, without a task
        results = [await _step_group(engine, block, groups[0])]
    else:  # none, or sessions of several versions (rare): their blocks run side by side
        results = list(await asyncio.gather(*(_step_group(engine, block, g) for g in groups)))
    y, step_indexes = _merged(block, groups, results, errors)
    # every lookup pushed its session's deadline to now + TTL: one answers for all of them
    first = next((g.sessions[0] for g in groups if g.sessions), None)
    expires_at = engine.expires_at(first) if first is not None else 0.0
    reply = packed_results(block.m, y, step_indexes, errors, entry_error, expires_at)
    return pb.StepManyResponse(packed=reply)


def packed_reply_bytes(block: Block) -> int:
    """Bound of a packed reply's size: raw (N, T, O) and probabilities (N, T, K) floats,
    indexes (N, T) of at most 5 bytes each, a step index per entry and an error per entry
    whose rows are already known bad (the entries that fail later, rarely, are not counted)."""
    m = block.m
    per_step = 4 * m.output.size
    if m.output.kind != "regression":
        per_step += 4 * len(m.labels) + 5
    entries = len(block.session_ids)
    errors = int(block.bad.sum()) * ENTRY_ERROR_BYTES
    return entries * block.steps * per_step + entries * 10 + errors + 64


def _grouped(engine: Engine, block: Block, errors: dict[int, Exception]) -> list[_Group]:
    """The block's entries that can run, by model version; the others' errors into ``errors``."""
    ids, foreign = own_session_ids(block.session_ids)  # another transport's ids: unknown here
    found = engine.sessions.get_many(ids)
    groups: dict[str, _Group] = {}  # by the sessions' "name:version"
    group: _Group | None = None
    for pos, sess in enumerate(found):  # the per-entry loop: keep it lean
        if type(sess) is not Session:
            errors[pos] = sess  # type: ignore[assignment]  # SessionExpired / SessionNotFound
            continue
        if group is None or sess.key != group.key:
            group = groups.get(sess.key)
            if group is None:
                rt = engine.runtime_of(sess)
                group = groups[sess.key] = _Group(rt, model_problem(block, rt.manifest))
        if group.problem is not None:
            errors[pos] = group.problem
            continue
        group.positions.append(pos)
        group.sessions.append(sess)
    errors.update(foreign)
    if block.bad.any():
        for g in groups.values():
            _drop_bad_rows(block, g, errors)
    return [g for g in groups.values() if g.positions]


def _drop_bad_rows(block: Block, g: _Group, errors: dict[int, Exception]) -> None:
    """Entries whose rows ``block.bad`` marks fail alone."""
    keep = [i for i, pos in enumerate(g.positions) if not block.bad[pos]]
    for i in set(range(len(g.positions))).difference(keep):
        errors[g.positions[i]] = row_problem(block, g.positions[i])
    g.positions = [g.positions[i] for i in keep]
    g.sessions = [g.sessions[i] for i in keep]


async def _step_group(engine: Engine, block: Block, g: _Group) -> BlockResult:
    whole = len(g.positions) == len(block.session_ids)
    x = block.x if whole else block.x[g.positions]  # (n, T, ...)
    indexes = block.step_indexes
    if indexes is not None and not whole:
        indexes = [indexes[pos] for pos in g.positions]
    return await engine.step_block(g.rt, g.sessions, x, indexes)


def _merged(
    block: Block, groups: list[_Group], results: list[BlockResult], errors: dict[int, Exception]
) -> tuple[np.ndarray, list[int]]:
    """The groups' answers as the block's y (N, T, O) and step indexes; their errors into
    ``errors`` by block position."""
    n, m = len(block.session_ids), block.m
    if len(groups) == 1 and not errors and not results[0].errors and len(groups[0].positions) == n:
        return results[0].y, results[0].step_indexes  # the common case: every entry ran
    y = np.zeros((n, block.steps, m.output.size), FLOAT32_LE)  # (N, T, O)
    step_indexes = [0] * n
    for g, r in zip(groups, results, strict=True):
        y[g.positions] = r.y
        for pos, index in zip(g.positions, r.step_indexes, strict=True):
            step_indexes[pos] = index
        for i, err in r.errors.items():
            errors[g.positions[i]] = _in_packed_terms(err)
    return y, step_indexes


def _in_packed_terms(err: Exception) -> Exception:
    """The engine names the block's time length ``steps``; this message calls it packed.steps."""
    if type(err) is InvalidInput and err.field == "steps":
        return InvalidInput(str(err), field="packed.steps")
    return err


def packed_results(
    m: Manifest,
    y: np.ndarray,
    step_indexes: list[int],
    errors: dict[int, Exception],
    entry_error: EntryErrorFn,
    expires_at: float,
) -> pb.PackedResults:
    """The reply from y (N, T, O) (zeros where an entry failed) and the errors by position."""
    y = y.astype(FLOAT32_LE, copy=False)
    reply = pb.PackedResults(
        step_indexes=step_indexes,
        raw=y.tobytes(),
        errors=[
            pb.EntryError(position=pos, error=entry_error(err))
            for pos, err in sorted(errors.items())
        ],
        expires_at=expires_at,
    )
    if m.output.kind != "regression":
        p = codec.probabilities(m, y).astype(FLOAT32_LE, copy=False)  # (N, T, K)
        if errors:
            p[list(errors)] = 0.0  # a failed entry has no distribution
        reply.probabilities = p.tobytes()
        reply.index.extend(p.argmax(axis=-1).ravel().tolist())  # (N * T,)
    return reply
