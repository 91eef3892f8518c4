"""The independent reference every serving test compares with: training's eager PyTorch models,
run one sequence at a time (tests/ is on sys.path via conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.reference import load_eager

TOL = 1e-5


class Reference:
    """Eager models of a store's version 1, loaded once each."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self._models: dict[str, torch.nn.Module] = {}

    def model(self, name: str) -> torch.nn.Module:
        if name not in self._models:
            self._models[name] = load_eager(self.store / name / "1")
        return self._models[name]

    def run(self, name: str, chunks: list[np.ndarray]) -> np.ndarray:
        """One session fed every chunk in order, from the initial state: (T_total, O)."""
        x = torch.from_numpy(np.concatenate(chunks)[None])  # (1, T, F) or (1, T)
        m = self.model(name)
        with torch.inference_mode():
            return m.step(x, *m.init_states(1))[0][0].numpy()

    def run_many(self, name: str, sessions: list[list[np.ndarray]]) -> list[np.ndarray]:
        """``run`` of many sessions as one batch, each right-padded to the longest: a streamable
        model's output at a step reads no later step, so the padding changes no output kept."""
        xs = [np.concatenate(chunks) for chunks in sessions]
        longest = max(len(x) for x in xs)
        batch = np.zeros((len(xs), longest, *xs[0].shape[1:]), dtype=xs[0].dtype)  # (B, T[, F])
        for b, x in enumerate(xs):
            batch[b, : len(x)] = x
        m = self.model(name)
        with torch.inference_mode():
            y = m.step(torch.from_numpy(batch), *m.init_states(len(xs)))[0].numpy()  # (B, T, O)
        return [y[b, : len(x)] for b, x in enumerate(xs)]

    def sequence(self, name: str, rows: list[np.ndarray]) -> np.ndarray:
        """Each whole row alone through the sequence graph's eager twin: (B, O)."""
        m = self.model(name)
        with torch.inference_mode():
            return np.concatenate(
                [
                    m.sequence(torch.from_numpy(r[None]), torch.tensor([len(r)])).numpy()
                    for r in rows
                ]
            )
