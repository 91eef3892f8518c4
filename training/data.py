"""The seeds' tasks, made learnable, and the text corpus: every split is deterministic from a seed.

A task returns ``TaskData``: three ``Split``s plus what the manifest needs (vocabulary, labels).
``mode`` tells the training loop how outputs are scored:

* ``last``: one label per row, read after the row's last valid step (``model.sequence``);
* ``steps``: one target per valid step (``model.step`` over the whole row);
* ``carry``: regression on long series cut into consecutive windows, hidden state carried across
  windows as in seed 003.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["last", "steps", "carry"]
TASK_WORDS = {  # manifest.task: the task in human words
    "sum_sign": "is the sum of the sequence > 0",
    "argmax_sum": "which of the first 5 features has the largest sum",
    "window_sign": "at every step: is the sum of the last 3 inputs > 0",
    "sine": "next value of a sine wave of arbitrary phase and frequency",
    "hello": "next character of 'hello'",
    "text": "next character of the Python language reference",
}
SPLIT_OFFSET = {"train": 0, "val": 1_000_003, "test": 2_000_003}


@dataclass
class Split:
    inputs: torch.Tensor  # (N, T, F) float32 or (N, T) int64
    lengths: torch.Tensor  # (N,) int64, rows are right-padded after their length
    targets: torch.Tensor  # (N,) for "last", (N, T) for "steps"/"carry"

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass
class TaskData:
    mode: Mode
    train: Split
    val: Split
    test: Split
    vocab: list[str] | None = None  # token index -> character
    info: dict[str, object] = field(default_factory=dict)


def generator(seed: int, split: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + SPLIT_OFFSET[split])


def random_lengths(n: int, seq_len: int, min_len: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(min_len, seq_len + 1, (n,), generator=g)


def pad_garbage(x: torch.Tensor, lengths: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Fill every step past a row's length with noise: a model that reads padding gets it wrong."""
    T = x.shape[1]
    pad = torch.arange(T)[None, :] >= lengths[:, None]  # (N, T)
    noise = torch.randn(x.shape, generator=g) * 3
    return torch.where(pad.unsqueeze(-1), noise, x)


# ---- seed 000: sign of the sum ------------------------------------------------------------
def sum_sign_split(n: int, seq_len: int, min_len: int, g: torch.Generator, full: bool) -> Split:
    x = torch.randn(n, seq_len, 1, generator=g)  # (N, T, 1)
    lengths = torch.full((n,), seq_len) if full else random_lengths(n, seq_len, min_len, g)
    valid = torch.arange(seq_len)[None, :] < lengths[:, None]  # (N, T)
    y = ((x[..., 0] * valid).sum(1) > 0).long()  # (N,)
    return Split(pad_garbage(x, lengths, g), lengths, y)


# ---- seed 001: a learnable 5-class rule ---------------------------------------------------
def argmax_sum_split(
    n: int,
    seq_len: int,
    min_len: int,
    features: int,
    classes: int,
    shift: float,
    g: torch.Generator,
    full: bool,
) -> Split:
    """Label = which of the first ``classes`` features has the largest sum over the valid steps.

    The label is a pure function of the input; the generator shifts one feature's mean by
    ``shift`` so that classes are balanced and near-ties are rare.
    """
    chosen = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, seq_len, features, generator=g)  # (N, T, F)
    x[torch.arange(n), :, chosen] += shift
    lengths = torch.full((n,), seq_len) if full else random_lengths(n, seq_len, min_len, g)
    valid = (torch.arange(seq_len)[None, :] < lengths[:, None]).unsqueeze(-1)  # (N, T, 1)
    y = (x[..., :classes] * valid).sum(1).argmax(1)  # (N,)
    return Split(pad_garbage(x, lengths, g), lengths, y)


# ---- seed 004: a streaming classification task --------------------------------------------
def window_sign_split(n: int, seq_len: int, window: int, g: torch.Generator) -> Split:
    """At every step t: is x[t-window+1] + ... + x[t] > 0 (a short memory, read while streaming)."""
    x = torch.randn(n, seq_len, 1, generator=g)  # (N, T, 1)
    padded = torch.nn.functional.pad(x[..., 0], (window - 1, 0))  # (N, T + window - 1)
    sums = padded.unfold(1, window, 1).sum(-1)  # (N, T)
    return Split(x, torch.full((n,), seq_len), (sums > 0).long())


# ---- seed 003: sine, arbitrary phase and frequency ----------------------------------------
def sine_split(
    n: int, window: int, windows: int, dt: float, w_min: float, w_max: float, g: torch.Generator
) -> Split:
    """Rows are sin(w * dt * t + phase); inputs are steps 0..L-1, targets steps 1..L."""
    L = window * windows
    w = torch.empty(n, 1).uniform_(w_min, w_max, generator=g)
    phase = torch.empty(n, 1).uniform_(0, 2 * torch.pi, generator=g)
    t = torch.arange(L + 1, dtype=torch.float32)[None, :]
    s = torch.sin(w * dt * t + phase)  # (N, L + 1)
    return Split(s[:, :-1, None].contiguous(), torch.full((n,), L), s[:, 1:].contiguous())


# ---- seed 002: characters -----------------------------------------------------------------
# the seed built {c: i for i, c in enumerate("hello")}, which gives 'l' two indices
HELLO_VOCAB = ["h", "e", "l", "o"]


def hello_split(text: str, target: str) -> Split:
    index = {c: i for i, c in enumerate(HELLO_VOCAB)}
    x = torch.tensor([[index[c] for c in text]])
    y = torch.tensor([[index[c] for c in target]])
    return Split(x, torch.tensor([len(text)]), y)


def corpus() -> str:
    """The Python language reference that ships with the stdlib (about 0.46 MB)."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics))


def text_windows(ids: torch.Tensor, n: int, seq_len: int, g: torch.Generator) -> Split:
    starts = torch.randint(0, len(ids) - seq_len - 1, (n,), generator=g)
    rows = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # (N, T + 1)
    return Split(rows[:, :-1].contiguous(), torch.full((n,), seq_len), rows[:, 1:].contiguous())


def text_task(
    seed: int,
    n_train: int,
    n_val: int,
    n_test: int,
    seq_len: int,
    val_frac: float,
    test_frac: float,
) -> TaskData:
    text = corpus()
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
    # contiguous splits: the held-out text is never seen in training, not even overlapping
    n_val_chars, n_test_chars = int(len(ids) * val_frac), int(len(ids) * test_frac)
    train_ids = ids[: len(ids) - n_val_chars - n_test_chars]
    val_ids = ids[len(train_ids) : len(train_ids) + n_val_chars]
    test_ids = ids[len(train_ids) + n_val_chars :]
    counts = torch.bincount(train_ids, minlength=len(vocab)).double() + 1  # add-one smoothing
    p = counts / counts.sum()
    unigram = float(-(p[test_ids].log()).mean())  # nats/char of the unigram model on test text
    return TaskData(
        "steps",
        text_windows(train_ids, n_train, seq_len, generator(seed, "train")),
        text_windows(val_ids, n_val, seq_len, generator(seed, "val")),
        text_windows(test_ids, n_test, seq_len, generator(seed, "test")),
        vocab=vocab,
        info={"unigram_loss": unigram, "corpus_chars": len(text), "corpus": "pydoc_data.topics"},
    )


def three_splits(make: Callable[[int, torch.Generator, bool], Split], n, seed: int):
    """(train, val, test); ``make(rows, generator, full_length)``."""
    return (
        make(n[0], generator(seed, "train"), False),
        make(n[1], generator(seed, "val"), False),
        make(n[2], generator(seed, "test"), True),
    )


def sum_sign_task(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    def make(k: int, g: torch.Generator, full: bool) -> Split:
        return sum_sign_split(k, a["seq_len"], a["min_len"], g, full)

    return TaskData("last", *three_splits(make, n, seed))


def argmax_sum_task(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    def make(k: int, g: torch.Generator, full: bool) -> Split:
        return argmax_sum_split(
            k, a["seq_len"], a["min_len"], a["features"], a["classes"], a["shift"], g, full
        )

    return TaskData("last", *three_splits(make, n, seed))


def window_sign_task(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    def make(k: int, g: torch.Generator, _: bool) -> Split:
        return window_sign_split(k, a["seq_len"], a["window"], g)

    return TaskData("steps", *three_splits(make, n, seed))


def sine_task(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    def make(k: int, g: torch.Generator, _: bool) -> Split:
        return sine_split(k, a["window"], a["windows"], a["dt"], a["w_min"], a["w_max"], g)

    return TaskData("carry", *three_splits(make, n, seed))


def hello_task(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    split = hello_split(a["text"], a["target"])  # one row: train, validate and test on it
    return TaskData("steps", split, split, split, vocab=list(HELLO_VOCAB))


def text_task_entry(a: dict, seed: int, n: tuple[int, int, int]) -> TaskData:
    return text_task(seed, *n, **a)


TASKS: dict[str, Callable[[dict, int, tuple[int, int, int]], TaskData]] = {
    "sum_sign": sum_sign_task,
    "argmax_sum": argmax_sum_task,
    "window_sign": window_sign_task,
    "sine": sine_task,
    "hello": hello_task,
    "text": text_task_entry,
}


def train_shape(task: str, args: dict, n_train: int) -> tuple[int, int]:
    """(rows, steps per row) of a task's training split, without building it (time estimates)."""
    if task == "hello":
        return 1, len(args["text"])  # one row, whatever n_train says
    if task == "sine":
        return n_train, args["window"] * args["windows"]
    return n_train, args["seq_len"]


def build(task: str, args: dict, seed: int, n_train: int, n_val: int, n_test: int) -> TaskData:
    """The data of one task. Test splits of ``last`` tasks use full-length rows (the seeds' task);
    train and validation use variable lengths so the classifiers also answer short rows well."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}")
    return TASKS[task](args, seed, (n_train, n_val, n_test))


def variable_length_test(task: str, args: dict, seed: int, n: int) -> Split | None:
    """Held-out rows of varying length, for the ``last`` classifiers (None for other tasks)."""
    g = torch.Generator().manual_seed(seed * 7919 + 3_000_017)
    if task == "sum_sign":
        return sum_sign_split(n, args["seq_len"], args["min_len"], g, full=False)
    if task == "argmax_sum":
        a = args
        return argmax_sum_split(
            n, a["seq_len"], a["min_len"], a["features"], a["classes"], a["shift"], g, full=False
        )
    return None
