"""The training loop: Adam, gradient clipping, weight decay, early stopping, metrics.

``train(spec, seed, quick)`` returns a ``Trained`` (the best eager model by validation loss, its
history and its held-out metrics); ``training.export`` turns it into a model_store version.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import data as tasks
from training import plots
from training.models import ElmanRNN, RecurrentNet, build
from training.zoo import Arch, ModelSpec

Model = RecurrentNet | ElmanRNN  # both offer init_states, step and sequence


class TrainingError(RuntimeError):
    """Training cannot produce a usable model (NaN loss, ...): reported on one line."""


@dataclass
class Trained:
    spec: ModelSpec
    arch: Arch  # the spec's architecture with data-dependent sizes filled in
    model: RecurrentNet | ElmanRNN
    data: tasks.TaskData
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    seed: int
    quick: bool
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_arch(arch: Arch, data: tasks.TaskData) -> Arch:
    """Vocabulary-sized models take their sizes from the data."""
    if data.vocab is None:
        return arch
    return replace(arch, input_size=len(data.vocab), output_size=len(data.vocab))


# ---- losses -------------------------------------------------------------------------------
def step_mask(split_lengths: Tensor, steps: int) -> Tensor:
    return torch.arange(steps)[None, :] < split_lengths[:, None]  # (B, T)


def loss_of(spec: ModelSpec, y: Tensor, targets: Tensor) -> Tensor:
    """y: (N, O) raw head output, targets: (N,). Reads y the way manifest.output.activation says."""
    if spec.activation == "sigmoid":
        return F.binary_cross_entropy_with_logits(y[:, 0], targets.float())
    if spec.activation == "log_softmax":
        return F.nll_loss(y, targets)
    if spec.activation == "softmax":
        return F.cross_entropy(y, targets)
    return F.mse_loss(y[:, 0], targets)


LOSS_NAMES = {  # by manifest.output.activation, as loss_of reads it
    "sigmoid": "binary cross-entropy (nats)",
    "softmax": "cross-entropy (nats)",
    "log_softmax": "negative log-likelihood (nats)",
    "none": "mean squared error",
}


def batch_loss(spec: ModelSpec, model: Model, mode: str, x: Tensor, n: Tensor, t: Tensor) -> Tensor:
    """Loss of one batch of a ``last`` or ``steps`` task."""
    if mode == "last":
        return loss_of(spec, model.sequence(x, n), t)
    y = model.step(x, *model.init_states(x.shape[0]))[0]  # (B, T, O)
    mask = step_mask(n, x.shape[1])
    return loss_of(spec, y[mask], t[mask])


def check_finite(loss: Tensor, spec: ModelSpec, epoch: int) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"{spec.name}: loss is {loss.item()} (not finite) in epoch {epoch}; "
            "lower the learning rate (--set lr=...) or check the data"
        )


# ---- one epoch ----------------------------------------------------------------------------
def run_epoch(
    spec: ModelSpec,
    model: Model,
    opt: torch.optim.Optimizer,
    split: tasks.Split,
    mode: str,
    clip: float,
    batch: int,
    g: torch.Generator,
    epoch: int,
) -> float:
    model.train()
    order = torch.randperm(len(split), generator=g)
    total, count = 0.0, 0
    for start in range(0, len(split), batch):
        idx = order[start : start + batch]
        x, n, t = split.inputs[idx], split.lengths[idx], split.targets[idx]
        if mode == "carry":
            loss = carry_windows(spec, model, opt, x, t, clip, epoch)
        else:
            loss = batch_loss(spec, model, mode, x, n, t)
            check_finite(loss, spec, epoch)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            loss = loss.item()
        total, count = total + loss * len(idx), count + len(idx)
    return total / count


def carry_windows(
    spec: ModelSpec,
    model: Model,
    opt: torch.optim.Optimizer,
    x: Tensor,
    t: Tensor,
    clip: float,
    epoch: int,
) -> float:
    """Seed 003: consecutive windows of the same series, hidden state carried (detached)."""
    window = spec.task_args["window"]
    states = model.init_states(x.shape[0])
    losses = []
    for start in range(0, x.shape[1], window):
        y, *states = model.step(x[:, start : start + window], *states)  # (B, W, 1)
        states = [s.detach() for s in states]  # no backprop into earlier windows
        loss = F.mse_loss(y[..., 0], t[:, start : start + window])
        check_finite(loss, spec, epoch)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def eval_loss(spec: ModelSpec, model: Model, split: tasks.Split, mode: str) -> float:
    model.eval()
    if mode == "carry":
        return sine_mse(model, split, spec.task_args["warmup"])
    return float(batch_loss(spec, model, mode, split.inputs, split.lengths, split.targets))


# ---- the loop -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Epoch:
    """One finished epoch, as a progress display receives it."""

    number: int  # 1-based
    train_loss: float
    val_loss: float
    improved: bool  # the lowest validation loss so far: these weights are kept for now
    seconds: float  # its training and validation


def train(
    spec: ModelSpec,
    seed: int = 0,
    quick: bool = False,
    on_epoch: Callable[[Epoch], None] | None = None,
) -> Trained:
    began = time.perf_counter()
    hp = spec.hyper_for(quick)
    seed_everything(seed)
    data = tasks.build(spec.task, spec.task_args, seed, hp.n_train, hp.n_val, hp.n_test)
    arch = resolve_arch(spec.arch, data)
    model = build(arch)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    g = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
    best, best_state, stale = math.inf, copy.deepcopy(model.state_dict()), 0
    for epoch in range(hp.epochs):
        epoch_began = time.perf_counter()
        train_loss = run_epoch(spec, model, opt, data.train, data.mode, hp.clip, hp.batch, g, epoch)
        val_loss = eval_loss(spec, model, data.val, data.mode)
        seconds = time.perf_counter() - epoch_began
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        improved = val_loss < best
        if on_epoch is not None:
            on_epoch(Epoch(epoch + 1, train_loss, val_loss, improved, seconds))
        if improved:
            best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= hp.patience:
                break  # early stopping: the validation loss stopped improving
    model.load_state_dict(best_state)
    model.eval()
    metrics = evaluate(spec, model, data, seed, quick)
    metrics["epochs_run"] = len(history["train_loss"])
    metrics["best_val_loss"] = best
    return Trained(
        spec, arch, model, data, history, metrics, seed, quick, time.perf_counter() - began
    )


# ---- held-out metrics ---------------------------------------------------------------------
def predictions(spec: ModelSpec, y: Tensor) -> Tensor:
    return (y[:, 0] > 0).long() if spec.activation == "sigmoid" else y.argmax(-1)


def confusion_matrix(pred: Tensor, true: Tensor, classes: int) -> list[list[int]]:
    m = torch.zeros(classes, classes, dtype=torch.long)
    m.index_put_((true, pred), torch.ones_like(true), accumulate=True)
    return m.tolist()


@torch.no_grad()
def evaluate(spec: ModelSpec, model: Model, data: tasks.TaskData, seed: int, quick: bool) -> dict:
    metrics: dict[str, Any]
    if spec.task == "text":
        metrics = text_metrics(spec, model, data, seed)
    elif spec.task == "hello":
        metrics = hello_metrics(model, data)
    elif data.mode == "carry":
        metrics = sine_metrics(spec, model, data)
    else:
        metrics = classifier_metrics(spec, model, data, seed)
    value = metrics[spec.bar.metric]
    metrics["bar"] = spec.bar.describe(quick)
    metrics["passed"] = bool(spec.bar.passes(value, quick))
    return metrics


def classifier_metrics(spec: ModelSpec, model: Model, data: tasks.TaskData, seed: int) -> dict:
    test = data.test
    if data.mode == "last":
        y = model.sequence(test.inputs, test.lengths)
        pred, true = predictions(spec, y), test.targets
    else:  # per-step labels
        y = model.step(test.inputs, *model.init_states(len(test)))[0]
        mask = step_mask(test.lengths, test.inputs.shape[1])
        pred, true = predictions(spec, y[mask]), test.targets[mask]
    labels = spec.labels or []
    out = {
        "accuracy": float((pred == true).float().mean()),
        "scored_per": "step" if data.mode == "steps" else "sequence",
        "test_rows": len(test),
        "confusion": confusion_matrix(pred, true, len(labels)),
        "labels": labels,
    }
    varying = tasks.variable_length_test(spec.task, spec.task_args, seed, len(test))
    if varying is not None:
        vp = predictions(spec, model.sequence(varying.inputs, varying.lengths))
        out["accuracy_variable_length"] = float((vp == varying.targets).float().mean())
    return out


def hello_metrics(model: Model, data: tasks.TaskData) -> dict:
    vocab = data.vocab or []
    y = model.step(data.test.inputs, *model.init_states(1))[0]  # (1, T, V)
    pred = y.argmax(-1)[0]
    return {
        "exact_steps": float((pred == data.test.targets[0]).float().mean()),
        "input": "".join(vocab[i] for i in data.test.inputs[0].tolist()),
        "predicted": "".join(vocab[i] for i in pred.tolist()),
        "vocab": vocab,
    }


def sine_mse(model: Model, split: tasks.Split, warmup: int) -> float:
    """One-step MSE over whole series (hidden carried from step 0), after ``warmup`` steps."""
    y = model.step(split.inputs, *model.init_states(len(split)))[0][..., 0]  # (N, L)
    return float(F.mse_loss(y[:, warmup:], split.targets[:, warmup:]))


def sine_forecast(model: Model, context: Tensor, steps: int) -> list[float]:
    """Feed ``context`` (T,), then feed each prediction back in for ``steps`` steps."""
    y, *states = model.step(context.view(1, -1, 1), *model.init_states(1))
    value, out = y[:, -1:], []
    for _ in range(steps):
        out.append(float(value))
        value, *states = model.step(value.view(1, 1, 1), *states)
    return out


def sine_metrics(spec: ModelSpec, model: Model, data: tasks.TaskData) -> dict:
    test, horizon = data.test, 50
    context = test.inputs[0, : 3 * spec.task_args["window"], 0]
    truth = test.inputs[0, len(context) : len(context) + horizon, 0]
    predicted = sine_forecast(model, context, horizon)
    return {
        "mse": sine_mse(model, test, spec.task_args["warmup"]),
        "forecast_mse_50": float(F.mse_loss(torch.tensor(predicted), truth)),
        "forecast": {"context": context.tolist(), "truth": truth.tolist(), "predicted": predicted},
        "test_series": len(test),
    }


def sample_text(
    model: Model, vocab: list[str], prompt: str, length: int, g: torch.Generator
) -> str:
    index = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([[index[c] for c in prompt]])
    y, *states = model.step(tokens, *model.init_states(1))
    out = []
    for _ in range(length):
        probs = torch.softmax(y[0, -1] / 0.8, dim=-1)  # temperature 0.8
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(vocab[nxt])
        y, *states = model.step(torch.tensor([[nxt]]), *states)
    return prompt + "".join(out)


def text_metrics(spec: ModelSpec, model: Model, data: tasks.TaskData, seed: int) -> dict:
    test = data.test
    y = model.step(test.inputs, *model.init_states(len(test)))[0]  # (N, T, V)
    loss = float(F.cross_entropy(y.reshape(-1, y.shape[-1]), test.targets.reshape(-1)))
    unigram = float(data.info["unigram_loss"])
    g = torch.Generator().manual_seed(seed)
    vocab = data.vocab or []
    samples = [sample_text(model, vocab, p, 160, g) for p in ("The ", "def ", "class ")]
    for s in samples:
        print(f"[{spec.name} sample] {s!r}")
    return {
        "loss": loss,
        "bits_per_char": loss / math.log(2),
        "unigram_loss": unigram,
        "loss_vs_unigram": loss / unigram,
        "samples": samples,
        "corpus": data.info["corpus"],
        "corpus_chars": data.info["corpus_chars"],
    }


# ---- plots ---------------------------------------------------------------------------------
def why_validation_lower(spec: ModelSpec) -> list[str]:
    """Reasons this model's validation loss can sit below its training loss (loss plot caption)."""
    reasons = []
    if spec.arch.dropout > 0:
        reasons.append(
            f"dropout (p = {spec.arch.dropout:g}) is active while training and off for validation"
        )
    if "warmup" in spec.task_args:  # the carried-state series (sine): see sine_mse
        reasons.append(
            f"validation skips each series' first {spec.task_args['warmup']} steps, where the "
            "hidden state has not locked on yet; training counts them"
        )
    reasons.append(
        "the training loss is the mean over the epoch, while the weights were still improving; "
        "validation is measured once, after the epoch"
    )
    return reasons


def write_plots(
    spec: ModelSpec, history: dict, m: dict, hyper: dict[str, Any], folder: Path
) -> list[str]:
    """PNG files into ``folder``; returns their names. ``hyper``: the run's ``Hyper`` as a dict."""
    files = ["loss.png"]
    info = plots.LossInfo(
        loss_name=LOSS_NAMES[spec.activation],
        max_epochs=int(hyper.get("epochs", len(history["val_loss"]))),
        patience=int(hyper.get("patience", 0)),
        why_validation_lower=why_validation_lower(spec),
    )
    plots.loss_curves(history, f"{spec.name}: loss per epoch", info, folder / "loss.png")
    if "confusion" in m:
        per = " per step" if m.get("scored_per") == "step" else ""
        title = f"{spec.name}: held-out confusion{per}"
        plots.confusion(m["confusion"], m["labels"], title, folder / "confusion.png")
        files.append("confusion.png")
    if "forecast" in m:
        f = m["forecast"]
        plots.forecast(f["context"], f["truth"], f["predicted"], folder / "forecast.png")
        files.append("forecast.png")
    return files
