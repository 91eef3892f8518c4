"""PNG plots: loss curves, confusion matrix and sine forecast next to each exported model, and one
training summary per store (every model's held-out metric against its quality bar)."""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, FuncFormatter, MaxNLocator, NullFormatter

DPI = 100
CMAP = plt.get_cmap("Blues")
PASS_COLOR, MISS_COLOR = "#2e7d32", "#c62828"


@dataclass(frozen=True)
class LossInfo:
    """What the loss curves need to say beyond the numbers."""

    loss_name: str  # the y axis: "cross-entropy (nats)", "mean squared error", ...
    max_epochs: int
    patience: int
    why_validation_lower: list[str]  # reasons validation loss can sit below training loss


def best_epoch(val_loss: list[float]) -> int:
    """The epoch (1-based) whose weights early stopping kept: the first lowest validation loss."""
    return min(range(len(val_loss)), key=val_loss.__getitem__) + 1


def loss_curves(history: dict[str, list[float]], title: str, info: LossInfo, path: Path) -> None:
    save(loss_figure(history, title, info), path)


def save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def loss_figure(history: dict[str, list[float]], title: str, info: LossInfo) -> Figure:
    train, val = history["train_loss"], history["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    epochs = range(1, len(train) + 1)
    style = ".-" if len(train) <= 40 else "-"  # dots per epoch until they merge into a line
    ax.plot(epochs, train, style, label="training (mean over the epoch)")
    ax.plot(epochs, val, style, label="validation (after the epoch)")
    if val:
        kept = best_epoch(val)
        ax.axvline(kept, color="0.4", linestyle=":", linewidth=1)
        ax.plot([kept], [val[kept - 1]], "o", color="black", markersize=8, fillstyle="none")
        right_half = kept > (len(val) + 1) / 2
        ax.annotate(
            f"kept: epoch {kept}",
            (kept, val[kept - 1]),
            xytext=(-8 if right_half else 8, 10),
            textcoords="offset points",
            ha="right" if right_half else "left",
        )
    if len(train) <= 15:
        ax.set_xticks(list(epochs))
        ax.set_xlim(0.5, len(train) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # not 10^-1
    ax.yaxis.set_minor_formatter(minor_labels(*ax.get_ylim()))
    ax.set(xlabel="epoch", ylabel=f"{info.loss_name}, log scale", title=title)
    ax.legend()
    fig.text(0.01, 0.01, loss_caption(train, val, info), fontsize=8, va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    return fig


def minor_labels(low: float, high: float) -> Formatter:
    """Labels between a log axis' powers of ten: all of them on a short axis, the 2s and 5s over
    up to two and a half decades, none beyond (the powers of ten suffice, more would overlap)."""
    decades = math.log10(high / low)
    if decades < 0.5:
        return FuncFormatter(lambda value, _: f"{value:g}")
    if decades < 2.5:
        return FuncFormatter(lambda value, _: f"{value:g}" if f"{value:e}"[0] in "25" else "")
    return NullFormatter()


def loss_caption(train: list[float], val: list[float], info: LossInfo) -> str:
    if not val:
        return "No training history recorded for this version."
    n, kept = len(val), best_epoch(val)
    if n < info.max_epochs:
        stop = (
            f"Early stopping ended training after epoch {n} of {info.max_epochs}: "
            f"{info.patience} epochs without a lower validation loss."
        )
    else:
        stop = f"Ran all {n} epochs." if n > 1 else "Ran its one epoch."
    lines = [f"{stop} The exported weights are those of epoch {kept}, the lowest validation loss."]
    lower = [i + 1 for i in range(n) if val[i] < train[i]]
    if lower and info.why_validation_lower:
        where = "in every epoch" if len(lower) == n else f"in epochs {spans(lower)}"
        reasons = "; ".join(info.why_validation_lower)
        lines.append(f"Validation loss sits below training loss {where}: {reasons}.")
    return "\n".join(textwrap.fill(line, 115) for line in lines)


def spans(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def text_color(rgb: tuple[float, float, float]) -> str:
    """Black on light cells, white on dark ones (WCAG relative luminance)."""
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb)
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.18 else "white"


def confusion(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> None:
    save(confusion_figure(matrix, labels, title), path)


def confusion_figure(matrix: list[list[int]], labels: list[str], title: str) -> Figure:
    """Counts and row-normalised percentages (share of each true class); the colour is the share."""
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(matrix)))
    shares = [[count / max(1, sum(row)) for count in row] for row in matrix]
    size = 1.3 * len(labels) + 2.2
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(shares, cmap=CMAP, vmin=0, vmax=1)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            color = text_color(to_rgb(CMAP(shares[i][j])))
            text = f"{count}\n{100 * shares[i][j]:.1f}%" if count else "0"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=10)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    accuracy = f"accuracy {100 * correct / max(1, total):.1f}% ({correct} of {total})"
    ax.set(xlabel="predicted", ylabel="true", title=f"{title}\n{accuracy}")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class (row)")
    fig.tight_layout()
    return fig


def forecast(context: list[float], truth: list[float], predicted: list[float], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    n = len(context)
    ax.plot(range(n), context, "k.", label="context (fed to the model)")
    future = range(n, n + len(truth))
    ax.plot(future, truth, "b-", label="truth")
    ax.plot(future, predicted, "r--", label=f"{len(predicted)}-step autoregressive forecast")
    ax.axvline(n - 0.5, color="0.6", linewidth=1)
    ax.set(xlabel="step", ylabel="sin(w t + phase)", title="sine: forecast vs truth")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False)
    fig.tight_layout()
    save(fig, path)


# ---- the store's summary ------------------------------------------------------------------
@dataclass(frozen=True)
class BarResult:
    """One model's held-out metric against its quality bar."""

    name: str
    version: int
    metric: str
    value: float
    limit: float
    higher_is_better: bool
    quick: bool

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


def metric_axis(r: BarResult) -> tuple[str, float, float]:
    """(scale, low, high) that shows both the value and the limit with room around them."""
    lo, hi = min(r.value, r.limit), max(r.value, r.limit)
    if not r.higher_is_better and lo > 0 and hi / lo > 20:  # errors spanning decades: mse
        return "log", lo / 5, hi * 5
    if r.higher_is_better and hi <= 1:  # shares: accuracy, exact steps
        low = max(0.0, lo - max(0.05, 0.5 * (1 - lo)))
        return "linear", low, 1 + 0.03 * (1 - low)
    return "linear", 0.0, hi * 1.3 if hi > 0 else 1.0


def summary(results: list[BarResult], unreadable: dict[str, str], title: str, path: Path) -> None:
    save(summary_figure(results, unreadable, title), path)


def summary_figure(results: list[BarResult], unreadable: dict[str, str], title: str) -> Figure:
    """One row per model: the value as a dot on its own axis, the bar as a line, the failing side
    shaded; the verdict in words beside it."""
    rows = max(1, len(results))
    fig, axes = plt.subplots(rows, 1, figsize=(9.5, 0.72 * rows + 1.6), squeeze=False)
    for ax, r in zip(axes[:, 0], results, strict=False):
        summary_row(ax, r)
    if not results:
        axes[0, 0].set_axis_off()
    passed = sum(r.passed for r in results)
    heading = f"{title}\n{passed} of {len(results)} models pass their quality bar"
    fig.suptitle(heading, fontsize=11)
    key = "dot: held-out value;  line: the quality bar;  shaded: the side that misses it"
    notes = [f"{name}: unreadable ({why})" for name, why in sorted(unreadable.items())]
    fig.text(0.01, 0.005, key, fontsize=8, color="0.3")
    if notes:
        text = textwrap.fill("; ".join(notes), 140)
        fig.text(0.01, 0.03, text, fontsize=8, color=MISS_COLOR, va="bottom")
    fig.tight_layout(rect=(0, 0.08 if notes else 0.04, 1, 1))
    return fig


def summary_row(ax: plt.Axes, r: BarResult) -> None:
    scale, lo, hi = metric_axis(r)
    ax.set_xscale(scale)
    ax.set_xlim(lo, hi)
    ax.set_ylim(-1, 1)
    ax.set_yticks([])
    failing = (lo, r.limit) if r.higher_is_better else (r.limit, hi)
    ax.axvspan(*failing, color=MISS_COLOR, alpha=0.08)
    ax.axvline(r.limit, color="0.3", linewidth=1.5)
    color = PASS_COLOR if r.passed else MISS_COLOR
    ax.plot([r.value], [0], "o", color=color, markersize=9, clip_on=False)
    ax.tick_params(axis="x", labelsize=8, pad=1)
    if scale == "log":
        ax.xaxis.set_minor_formatter(NullFormatter())
    mode = " (quick)" if r.quick else ""
    left = f"{r.name} v{r.version}{mode}\n{r.metric}"
    ax.text(-0.01, 0.5, left, transform=ax.transAxes, ha="right", va="center", fontsize=9)
    op = "≥" if r.higher_is_better else "≤"
    verdict = "passed" if r.passed else "MISSED"
    right = f"{format_value(r.value)}\nbar {op} {format_value(r.limit)}: {verdict}"
    ax.text(1.01, 0.5, right, transform=ax.transAxes, va="center", fontsize=9, color=color)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)


def format_value(value: float) -> str:
    """0.947, 5.4e-05, 1."""
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
        return f"{value:.2g}"
    return f"{value:.3f}".rstrip("0").rstrip(".")
