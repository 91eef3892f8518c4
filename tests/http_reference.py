"""The independent reference for TorchServe's JSON replies: request bodies decoded and computed
here with training's eager PyTorch models, never with the serving code under test."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from serving.manifest import Manifest

ATOL = 1e-4  # ONNX Runtime vs eager PyTorch on probabilities (export's parity bar: 1e-5 raw)


def random_body(m: Manifest, steps: int, rng: np.random.Generator) -> dict[str, Any]:
    if m.input.kind == "tokens":
        vocab = m.input.vocab or []
        return {"text": "".join(vocab[i] for i in rng.integers(0, len(vocab), steps))}
    return {"inputs": rng.normal(size=(steps, m.input.features)).round(4).tolist()}


def as_tensor(m: Manifest, body: dict[str, Any]) -> torch.Tensor:
    """(1, T, F) float32 or (1, T) int64, decoded here, not by the codec."""
    if m.input.kind == "tokens":
        index = {c: i for i, c in enumerate(m.input.vocab or [])}
        return torch.tensor([[index[c] for c in body["text"]]], dtype=torch.int64)
    return torch.tensor([body["inputs"]], dtype=torch.float32)


def eager_alone(eager: torch.nn.Module, m: Manifest, body: dict[str, Any]) -> torch.Tensor:
    x = as_tensor(m, body)
    with torch.no_grad():
        return eager.sequence(x, torch.tensor([x.shape[1]]))[0]  # (O,)


def eager_probabilities(m: Manifest, y: torch.Tensor) -> list[float]:
    if m.output.activation == "sigmoid":
        p = torch.sigmoid(y[0])
        return [float(1 - p), float(p)]
    if m.output.activation == "log_softmax":
        return torch.exp(y).tolist()
    return torch.softmax(y, dim=-1).tolist()


def assert_matches(m: Manifest, reply: dict[str, Any], y: torch.Tensor) -> None:
    assert reply["model"] == m.name and reply["version"] == m.version
    if m.output.kind == "regression":
        assert reply["value"] == pytest.approx(float(y[0]), abs=ATOL)
        return
    p = eager_probabilities(m, y)
    if m.output.kind == "classification":
        assert reply["labels"] == m.output.labels  # the order of "probabilities"
        assert reply["probabilities"] == pytest.approx(p, abs=ATOL)
        assert reply["label"] == (m.output.labels or [])[int(np.argmax(p))]
    else:
        top = reply["top_k"][0]
        assert top["p"] == pytest.approx(max(p), abs=ATOL)
        assert reply["char"] == top["char"] == (m.output.vocab or [])[int(np.argmax(p))]


def eager_rollout(eager: torch.nn.Module, m: Manifest, body: dict[str, Any], n: int) -> list:
    """Greedy: feed the argmax character (or the predicted value) back, one step at a time."""
    x = as_tensor(m, body)
    with torch.no_grad():
        y, *states = eager.step(x, *eager.init_states(1))
        out = []
        for _ in range(n):
            last = y[0, -1]
            if m.output.kind == "next_token":
                out.append(int(last.argmax()))
                nxt = torch.tensor([[out[-1]]], dtype=torch.int64)
            else:
                out.append(float(last[0]))
                nxt = last.reshape(1, 1, -1)
            y, *states = eager.step(nxt, *states)
    return out
