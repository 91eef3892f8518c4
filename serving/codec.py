"""Inputs into arrays (with validation), outputs into the model's own terms.

Every transport (our gRPC API, the OIP API, the TorchServe handler) calls these, so a mistake gets
the same message everywhere. Functions take plain Python/NumPy values and raise ``InvalidInput``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.errors import InvalidInput
from serving.manifest import Manifest

# ---- inputs -------------------------------------------------------------------------------


def check_steps(m: Manifest, steps: int, max_steps: int | None = None) -> None:
    limit = max_steps or m.input.max_steps
    if steps < 1:
        raise InvalidInput("empty input: send at least one time step", field="inputs")
    if steps > limit:
        raise InvalidInput(
            f"{steps} time steps in one request; {m.name} accepts at most {limit}", field="inputs"
        )


def decode_features(
    m: Manifest, values: Any, steps: int | None = None, max_steps: int | None = None
) -> np.ndarray:
    """``values`` as nested ``[[f1..fF], ...]`` or flat with ``steps`` given → float32 (T, F)."""
    if m.input.kind != "features":
        raise InvalidInput(f"{m.name} takes text/tokens, not feature vectors", field="inputs")
    f = int(m.input.features or 0)
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as e:  # Overflow: a JSON int of 400 digits
        # numpy's own words ("inhomogeneous shape…") don't tell a client what to send
        raise InvalidInput(
            f"inputs must be numbers shaped [T, {f}]: T time steps, each a list of {f} numbers",
            field="inputs",
        ) from e
    if steps is not None and arr.ndim == 1:
        if arr.size != steps * f:
            raise feature_count_error(m, arr.size, steps)
        arr = arr.reshape(steps, f)
    if arr.ndim == 1 and f == 1:
        arr = arr.reshape(-1, 1)  # a plain list of scalars is a sequence of 1-feature steps
    if arr.ndim != 2:
        raise InvalidInput(
            f"inputs must have shape [T, {f}] (T steps of {f} features), got {list(arr.shape)}",
            field="inputs",
        )
    check_steps(m, arr.shape[0], max_steps)
    if arr.shape[1] != f:
        raise feature_count_error(m, arr.size, arr.shape[0])
    if not np.isfinite(arr).all():
        raise InvalidInput("inputs contain NaN or Inf", field="inputs")
    return np.ascontiguousarray(arr)


def feature_count_error(m: Manifest, values: int, steps: int) -> InvalidInput:
    """The one message for features that do not fit the model, whether they came nested
    (``[[f..], ...]``: HTTP, OIP) or flat with a step count (our gRPC ``Features``)."""
    f = int(m.input.features or 0)
    return InvalidInput(
        f"{m.name} expects {_count(f, 'feature')} per step: {_count(values, 'value')} "
        f"do not make {_count(steps, 'step')} of {_count(f, 'feature')}",
        field="inputs",
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def decode_text(m: Manifest, text: str, max_steps: int | None = None) -> np.ndarray:
    """Characters → int64 token ids (T,), refusing characters outside the vocabulary."""
    vocab = _vocab(m)
    if not isinstance(text, str):
        raise InvalidInput("text must be a string", field="text")
    check_steps(m, len(text), max_steps)
    index = _char_index(m)
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10])
        raise InvalidInput(
            f"characters outside {m.name}'s vocabulary ({len(vocab)} chars): {shown}", field="text"
        )
    return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))


def decode_tokens(m: Manifest, ids: Sequence[int], max_steps: int | None = None) -> np.ndarray:
    """A flat list of integer ids → int64 (T,). Floats, strings and booleans are refused rather
    than truncated or parsed (``1.7`` is not token 1), and so are nested lists."""
    vocab = _vocab(m)
    try:
        arr = np.asarray(ids)  # no dtype: let the values say what they are
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"tokens must be a list of integers: {e}", field="tokens") from e
    if arr.ndim != 1:
        raise InvalidInput(
            f"tokens must be a flat list of integers, got shape {list(arr.shape)}", field="tokens"
        )
    check_steps(m, arr.shape[0], max_steps)
    if arr.dtype.kind not in "iu":  # object = ints too large for int64
        raise InvalidInput(f"tokens must be integers, got {arr.dtype} values", field="tokens")
    bad = arr[(arr < 0) | (arr >= len(vocab))]
    if bad.size:
        raise InvalidInput(
            f"token {int(bad[0])} is outside the vocabulary [0, {len(vocab)})", field="tokens"
        )
    return arr.astype(np.int64, copy=False)


def _vocab(m: Manifest) -> list[str]:
    if m.input.kind != "tokens" or not m.input.vocab:
        raise InvalidInput(f"{m.name} takes feature vectors, not text/tokens", field="text")
    return m.input.vocab


_INDEX_CACHE: dict[tuple[str, int], dict[str, int]] = {}


def _char_index(m: Manifest) -> dict[str, int]:
    key = (m.name, m.version)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = {c: i for i, c in enumerate(m.input.vocab or [])}
    return _INDEX_CACHE[key]


def batch_sequences(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (T_i, F) or (T_i,) rows into one (B, T_max, ...) array plus lengths (B,)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    t_max = int(lengths.max())
    first = rows[0]
    out = np.zeros((len(rows), t_max, *first.shape[1:]), dtype=first.dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, lengths


# ---- outputs ------------------------------------------------------------------------------


def probabilities(m: Manifest, y: np.ndarray) -> np.ndarray:
    """Head output (..., O) → probabilities (..., K) as the manifest's activation says."""
    act = m.output.activation
    if act == "sigmoid":  # one logit for "positive": K = 2 as [negative, positive]
        # in float64, as probabilities_row: 1 - p in float32 rounds a 5e-8 "negative" to 0
        p = 1.0 / (1.0 + np.exp(-y[..., :1].astype(np.float64)))
        return np.concatenate([1.0 - p, p], axis=-1).astype(y.dtype, copy=False)
    if act == "softmax":
        z = np.exp(y - y.max(axis=-1, keepdims=True))
        return z / z.sum(axis=-1, keepdims=True)
    if act == "log_softmax":
        return np.exp(y)
    raise ValueError(f"{m.name}: activation {act!r} has no probabilities")


def probabilities_row(m: Manifest, row: list[float]) -> list[float]:
    """``probabilities`` of one step's head output given as a list (O,) → list (K,), in plain
    Python: for the few numbers of one step that is several times cheaper than the NumPy calls
    (the per-message hot path of Step and Session), and equal to them within float32 rounding."""
    act = m.output.activation
    if act == "sigmoid":
        positive = 1.0 / (1.0 + math.exp(-row[0])) if row[0] > -700 else 0.0
        return [1.0 - positive, positive]
    if act == "softmax":
        top = max(row)
        z = [math.exp(v - top) for v in row]
        total = sum(z)
        return [v / total for v in z]
    if act == "log_softmax":
        return [math.exp(v) for v in row]
    raise ValueError(f"{m.name}: activation {act!r} has no probabilities")


def format_output(m: Manifest, y: np.ndarray, top_k: int = 5) -> dict[str, Any]:
    """One step's head output (O,) → a JSON-ready dict in the model's own terms, shaped as our
    gRPC ``Output`` (labels and probabilities as two aligned lists), with the numbers the gRPC
    reply carries: computed as its one-step path computes them, rounded to float32, and written
    as the shortest decimal that reads back as that float32 (``0.99999994``, not ``1.0``)."""
    kind = m.output.kind
    if kind == "regression":
        return {"value": float32_text(y[0]) if y.shape[-1] == 1 else [float32_text(v) for v in y]}
    p = probabilities_row(m, y.tolist())
    names = m.labels
    best = p.index(max(p))  # the first max, as argmax
    if kind == "classification":
        return {
            "label": names[best],
            "index": best,
            "labels": list(names),
            "probabilities": [float32_text(v) for v in p],
        }
    order = sorted(range(len(p)), key=p.__getitem__, reverse=True)[:top_k]
    return {
        "char": names[best],
        "index": best,
        "top_k": [{"char": names[i], "index": i, "p": float32_text(p[i])} for i in order],
    }


def float32_text(value: float) -> float:
    """``value`` rounded to float32, as the float whose JSON text is that float32's shortest
    round-trip decimal: what protobuf's JSON printer writes for the same gRPC ``float``."""
    return float(str(np.float32(value)))
