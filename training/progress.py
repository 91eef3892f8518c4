"""Training progress for people: "model k/N", each epoch's losses and the time left in the run.

On a terminal each model gets a tqdm bar, redrawn in place. Anywhere else (a pipe, a file, ``docker
compose logs``) each epoch is one plain line: a redrawn bar there is a stream of carriage returns
that grows a log by kilobytes per model and reads as one endless line.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

from training import data as tasks
from training.train import Epoch
from training.zoo import Arch, ModelSpec

# What one model's training is predicted to cost on one core of this machine (measured on the quick
# zoo). Only ratios between models matter: the estimate is rescaled by the run's own speed.
MACS_PER_S = 9e9  # multiply-adds of the forward pass a second, the backward pass included
OPTIMIZER_STEP_S = 2e-3  # one batch's backward launch, gradient clipping and Adam step
MODEL_FIXED_S = 3.0  # data, held-out metrics, ONNX + TorchScript export and parity checks
GATES = {"rnn": 1, "elman": 1, "gru": 3, "lstm": 4}
UNKNOWN_VOCAB = 100  # vocabulary-sized models (char) learn their size from the data
LINE_EVERY_S = 1.0  # plain output: at most one epoch line a second, besides each model's last


def step_macs(arch: Arch) -> float:
    """Multiply-adds of one time step of one row: every recurrent layer and the head."""
    directions = 2 if arch.bidirectional else 1
    width = arch.embedding or arch.input_size or UNKNOWN_VOCAB
    total = 0.0
    for _ in range(arch.layers):
        total += directions * GATES[arch.cell] * arch.hidden * (width + arch.hidden)
        width = directions * arch.hidden
    return total + width * (arch.output_size or UNKNOWN_VOCAB)


def epoch_seconds(spec: ModelSpec, quick: bool) -> float:
    """Predicted seconds of one epoch: training rows forward and backward, validation forward."""
    hp = spec.hyper_for(quick)
    rows, steps = tasks.train_shape(spec.task, spec.task_args, hp.n_train)
    windows = spec.task_args.get("windows", 1)  # the carried-state task steps once per window
    optimizer_steps = math.ceil(rows / hp.batch) * windows
    macs = (rows + min(rows, hp.n_val)) * steps * step_macs(spec.arch)
    return macs / MACS_PER_S + optimizer_steps * OPTIMIZER_STEP_S


def duration(seconds: float) -> str:
    """45 s, 3 min 20 s, 1 h 05 min."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class RunEstimate:
    """Seconds left in a run: every model's predicted epochs (all of them: early stopping is not
    foreseen) at the speed the run's epochs have had against prediction so far, plus the fixed
    cost per model (data, metrics, export) the run has measured."""

    def __init__(self, specs: list[ModelSpec], quick: bool, clock: Callable[[], float]) -> None:
        self.plan = [(epoch_seconds(s, quick), s.hyper_for(quick).epochs) for s in specs]
        self.clock = clock
        self.began = self.model_began = clock()
        self.model, self.epochs_done, self.model_epochs_s = 0, 0, 0.0
        self.epochs_s, self.epochs_predicted_s = 0.0, 0.0
        self.fixed_s: list[float] = []  # per finished model: its wall time outside epochs

    def model_started(self) -> None:
        self.model_began = self.clock()

    def epoch_done(self, seconds: float) -> None:
        self.epochs_done += 1
        self.model_epochs_s += seconds
        self.epochs_s += seconds
        self.epochs_predicted_s += self.plan[self.model][0]

    def model_done(self) -> None:
        """The current model is exported (early stopping may have skipped some of its epochs)."""
        self.fixed_s.append(self.clock() - self.model_began - self.model_epochs_s)
        self.model, self.epochs_done, self.model_epochs_s = self.model + 1, 0, 0.0

    def elapsed(self) -> float:
        return self.clock() - self.began

    def left(self) -> float:
        epochs = sum(n * cost for cost, n in self.plan[self.model :])
        if self.model < len(self.plan):
            epochs -= self.epochs_done * self.plan[self.model][0]
        speed = self.epochs_s / self.epochs_predicted_s if self.epochs_predicted_s else 1.0
        fixed = sum(self.fixed_s) / len(self.fixed_s) if self.fixed_s else MODEL_FIXED_S
        return max(0.0, epochs * speed + fixed * (len(self.plan) - self.model))

    def describe(self) -> str:
        if self.model >= len(self.plan):
            return f"run done in {duration(self.elapsed())}"
        return f"run {duration(self.elapsed())} elapsed, ~{duration(self.left())} left"


def draws_bars(stream: TextIO) -> bool:
    """A terminal with a width: tqdm draws nothing on one of zero columns (a pty nobody sized)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


class Progress:
    """Prints a run's progress to ``stream``: a bar per model on a terminal (``live``), else a line
    per epoch (epochs shorter than ``line_every_s`` share one: char_hello runs 300 epochs in a
    second); ``epochs=False`` keeps only the line per model."""

    def __init__(
        self,
        specs: list[ModelSpec],
        quick: bool,
        stream: TextIO,
        epochs: bool = True,
        live: bool | None = None,
        line_every_s: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quick, self.stream, self.epochs = quick, stream, epochs
        self.live = draws_bars(stream) if live is None else live
        self.line_every_s = line_every_s
        self.estimate = RunEstimate(specs, quick, clock)

    def say(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    @contextmanager
    def model(self, spec: ModelSpec, tag: str) -> Iterator[Callable[[Epoch], None]]:
        """Around one model's training and export; yields the training loop's ``on_epoch``."""
        epochs = spec.hyper_for(self.quick).epochs
        if self.epochs and self.live:
            desc = f"{tag} {spec.name}"
            bar = tqdm(total=epochs, desc=desc, unit="epoch", leave=False, file=self.stream)
        else:
            bar = None
        if self.epochs and not self.live:
            self.say(f"{tag} {spec.name}: training, up to {epochs} epochs")
        self.estimate.model_started()
        held: list[str] = []  # the newest epoch line not printed yet (printed when the model ends)
        last_line = [-math.inf]

        def on_epoch(e: Epoch) -> None:
            self.estimate.epoch_done(e.seconds)
            losses = f"train {e.train_loss:.4g}, validation {e.val_loss:.4g}"
            if bar is not None:
                bar.set_postfix_str(f"{losses} | {self.estimate.describe()}", refresh=False)
                bar.update(1)
                return
            best = " (best so far)" if e.improved else ""
            held[:] = [
                f"{tag} {spec.name} epoch {e.number}/{epochs}: {losses}{best}; "
                f"{e.seconds:.2g} s; {self.estimate.describe()}"
            ]
            now = self.estimate.clock()
            if self.epochs and now - last_line[0] >= self.line_every_s:
                self.say(held.pop())
                last_line[0] = now

        try:
            yield on_epoch
        finally:
            if bar is not None:
                bar.close()
        if self.epochs and held:
            self.say(held.pop())  # the epoch training ended with
        self.estimate.model_done()
