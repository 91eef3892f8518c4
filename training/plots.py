"""PNG plots written next to each exported model: loss curves, confusion matrix, sine forecast."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt


def loss_curves(history: dict[str, list[float]], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history["train_loss"]) + 1)
    ax.plot(epochs, history["train_loss"], label="train")
    ax.plot(epochs, history["val_loss"], label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels, rotation=45)
    ax.set_yticks(range(len(labels)), labels)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def forecast(context: list[float], truth: list[float], predicted: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    n = len(context)
    ax.plot(range(n), context, "k.", label="context (fed to the model)")
    future = range(n, n + len(truth))
    ax.plot(future, truth, "b-", label="truth")
    ax.plot(future, predicted, "r--", label=f"{len(predicted)}-step autoregressive forecast")
    ax.set(xlabel="step", ylabel="value", title="sine: forecast vs truth")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
