"""The model registry: every model of the zoo is one declarative entry here.

Adding a model means adding a ``ModelSpec`` to ``ZOO_LIST``: the architecture comes from ``Arch``,
the data from a task name in ``training.data.TASKS``, the loop settings from ``Hyper`` (with a
cheaper ``quick`` variant for tests) and the quality gate from ``Bar``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

CellKind = Literal["rnn", "lstm", "gru", "elman"]
EncoderKind = Literal["features", "onehot", "embedding"]


@dataclass(frozen=True)
class Arch:
    """What the network is. Stored in the manifest; ``training.models.build`` rebuilds from it."""

    cell: CellKind
    input_kind: EncoderKind
    input_size: int  # F for features, vocabulary size for tokens
    hidden: int
    output_size: int
    layers: int = 1
    bidirectional: bool = False
    dropout: float = 0.0  # between recurrent layers, and before the head
    embedding: int = 0  # embedding width, for input_kind == "embedding"
    log_softmax: bool = False  # the head ends in LogSoftmax (the Elman seed does)


@dataclass(frozen=True)
class Hyper:
    """How to train. Sizes, not wall-clock limits, bound a run: same seed, same model."""

    lr: float = 1e-2
    weight_decay: float = 0.0
    clip: float = 1.0
    batch: int = 64
    epochs: int = 30
    patience: int = 5  # early stopping: epochs without validation improvement
    n_train: int = 4000
    n_val: int = 1000
    n_test: int = 2000

    def __post_init__(self) -> None:
        """Refuse settings the loop cannot run with (``--set batch=0``) before any work starts."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                ok, rule = isinstance(value, int) and value >= 1, "an integer >= 1"
            elif f.name == "weight_decay":
                ok, rule = math.isfinite(value) and value >= 0, "a finite number >= 0"
            else:  # learning rate, clip norm
                ok, rule = math.isfinite(value) and value > 0, "a finite number > 0"
            if not ok:
                raise ValueError(f"{f.name} must be {rule}, got {value!r}")


def period_steps(w: float, dt: float) -> float:
    """Steps per cycle of sin(w t) sampled every ``dt``."""
    return 2 * math.pi / (w * dt)


def hyper_value(key: str, text: str) -> int | float:
    """``--set KEY=TEXT`` read as the type of ``Hyper.KEY``; a one-line ValueError otherwise."""
    kinds = {f.name: f.type for f in fields(Hyper)}
    if key not in kinds:
        raise ValueError(f"unknown hyperparameter {key!r}; known: {', '.join(kinds)}")
    try:
        return int(text) if kinds[key] == "int" else float(text)
    except ValueError:
        kind = "an integer" if kinds[key] == "int" else "a number"
        raise ValueError(f"--set {key} expects {kind}, got {text!r}") from None


@dataclass(frozen=True)
class Bar:
    """Held-out quality gate: ``metric`` >= (or <=) ``full`` (``quick`` in quick mode)."""

    metric: str
    full: float
    quick: float
    higher_is_better: bool = True

    def passes(self, value: float, quick: bool) -> bool:
        limit = self.quick if quick else self.full
        return value >= limit if self.higher_is_better else value <= limit

    def describe(self, quick: bool) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.metric} {op} {self.quick if quick else self.full:g}"


@dataclass(frozen=True)
class InputDoc:
    """What one step's input is, for people and clients: exported as manifest.input's
    ``description``, ``range`` and ``sampling`` (docs/manifest.md)."""

    description: str
    range: tuple[float, float] | None = None  # every value training fed lies in [min, max]
    dt: float | None = None  # signals in time: time between two steps
    angular_frequency: tuple[float, float] | None = None  # w of the sin(w t + phase) trained on


@dataclass(frozen=True)
class ModelSpec:
    name: str
    seed_doc: str  # which tutorial in shared/seeds it comes from
    description: str
    task: str  # key into training.data.TASKS
    task_args: dict[str, Any]
    arch: Arch
    hyper: Hyper
    quick: Hyper
    bar: Bar
    output_kind: Literal["classification", "regression", "next_token"]
    activation: Literal["softmax", "sigmoid", "log_softmax", "none"]
    inputs: InputDoc
    labels: list[str] | None = None
    max_steps: int = 1024
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def streamable(self) -> bool:
        # A backward direction needs the whole sequence: bidirectional models are sequence-only.
        return not self.arch.bidirectional

    def hyper_for(self, quick: bool) -> Hyper:
        return self.quick if quick else self.hyper

    def with_overrides(self, overrides: dict[str, Any], quick: bool) -> ModelSpec:
        """A copy with some ``Hyper`` fields replaced (``--set lr=0.1``)."""
        unknown = set(overrides) - set(asdict(self.hyper))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(sorted(unknown))}")
        if quick:
            return replace(self, quick=replace(self.quick, **overrides))
        return replace(self, hyper=replace(self.hyper, **overrides))


SUM_SIGN = dict(seq_len=10, min_len=1)
SEQ5 = dict(seq_len=50, min_len=10, features=10, classes=5, shift=0.8)
SINE = dict(window=20, windows=8, dt=0.15708, w_min=0.5, w_max=2.0, warmup=10)
SEQ5_LABELS = [f"class_{i}" for i in range(5)]
SEQ_HYPER = Hyper(lr=2e-3, weight_decay=1e-5, clip=5.0, epochs=15, patience=3, n_train=3000)
SEQ_QUICK = Hyper(
    lr=3e-3, weight_decay=1e-5, clip=5.0, epochs=3, n_train=1000, n_val=300, n_test=600
)


def _sum_sign(name: str, cell: CellKind) -> ModelSpec:
    return ModelSpec(
        name=name,
        seed_doc="000_b56c0d6b16d7239c.txt",
        description=f"nn.{cell.upper()} 1->32 binary classifier: is the sum of the sequence > 0",
        task="sum_sign",
        task_args=SUM_SIGN,
        arch=Arch(cell=cell, input_kind="features", input_size=1, hidden=32, output_size=1),
        hyper=Hyper(lr=5e-3, epochs=40, n_train=8000, patience=6),
        quick=Hyper(lr=1e-2, epochs=10, n_train=4000, n_val=500, n_test=1000),
        bar=Bar("accuracy", full=0.97, quick=0.90),
        output_kind="classification",
        activation="sigmoid",
        inputs=InputDoc(
            "one real number per step; trained on N(0, 1) draws, rows of 1-10 steps "
            "(the label is the sign of their sum)"
        ),
        labels=["negative", "positive"],
    )


def _seq5(name: str, cell: CellKind, bidirectional: bool, dropout: float) -> ModelSpec:
    kind = f"{'bidirectional ' if bidirectional else ''}{cell.upper()}"
    return ModelSpec(
        name=name,
        seed_doc="001_2554796699c4862a.txt",
        description=f"2-layer {kind} 10->128, 5 classes: which of features 0-4 sums highest",
        task="argmax_sum",
        task_args=SEQ5,
        arch=Arch(
            cell=cell,
            input_kind="features",
            input_size=10,
            hidden=128,
            output_size=5,
            layers=2,
            bidirectional=bidirectional,
            dropout=dropout,
        ),
        hyper=SEQ_HYPER,
        quick=SEQ_QUICK,
        bar=Bar("accuracy", full=0.90, quick=0.85),
        output_kind="classification",
        activation="softmax",
        inputs=InputDoc(
            "10 real features per step; trained on N(0, 1) draws with one of features 0-4 "
            "shifted by +0.8, rows of 10-50 steps (the class is which of features 0-4 sums "
            "highest; features 5-9 are noise)"
        ),
        labels=SEQ5_LABELS,
    )


def sine_input(a: dict[str, Any]) -> InputDoc:
    """The sine task's sampling grid and frequency range, from its task arguments."""
    dt, w_min, w_max = a["dt"], a["w_min"], a["w_max"]
    fastest, slowest = period_steps(w_max, dt), period_steps(w_min, dt)
    return InputDoc(
        f"one sample of sin(w t + phase) per step, t advancing by dt = {dt} between steps; "
        f"trained on w in [{w_min}, {w_max}] (one period every {fastest:.0f}-{slowest:.0f} "
        "steps), any phase",
        range=(-1.0, 1.0),
        dt=dt,
        angular_frequency=(w_min, w_max),
    )


ZOO_LIST: list[ModelSpec] = [
    _sum_sign("sum_sign_rnn", "rnn"),
    _sum_sign("sum_sign_lstm", "lstm"),
    _seq5("seq_lstm", "lstm", bidirectional=False, dropout=0.0),
    _seq5("seq_gru", "gru", bidirectional=False, dropout=0.3),
    _seq5("seq_bilstm", "lstm", bidirectional=True, dropout=0.0),
    ModelSpec(
        name="elman",
        seed_doc="004_19cbb2bec2528996.txt",
        description="hand-written Elman cell (Linear(concat(x,h)) -> tanh -> Linear -> "
        "LogSoftmax); streaming: is the sum of the last 3 inputs > 0, at every step",
        task="window_sign",
        task_args=dict(seq_len=20, window=3),
        arch=Arch(
            cell="elman",
            input_kind="features",
            input_size=1,
            hidden=32,
            output_size=2,
            log_softmax=True,
        ),
        hyper=Hyper(lr=1e-2, epochs=30, n_train=4000),
        quick=Hyper(lr=1e-2, epochs=6, n_train=1500, n_val=300, n_test=600),
        bar=Bar("accuracy", full=0.90, quick=0.85),
        output_kind="classification",
        activation="log_softmax",
        inputs=InputDoc(
            "one real number per step; trained on N(0, 1) draws, 20 steps a row (the label at "
            "each step is the sign of the sum of the last 3 inputs)"
        ),
        labels=["negative", "positive"],
    ),
    ModelSpec(
        name="sine",
        seed_doc="003_8153305822e012ab.txt",
        description="nn.RNN 1->32 regression: next value of sin(w t + phase), hidden state "
        "carried across consecutive 20-step windows",
        task="sine",
        task_args=SINE,
        arch=Arch(cell="rnn", input_kind="features", input_size=1, hidden=32, output_size=1),
        hyper=Hyper(lr=5e-3, epochs=60, n_train=2048, n_val=256, n_test=512, batch=32, patience=8),
        quick=Hyper(lr=1e-2, epochs=12, n_train=512, n_val=128, n_test=256, batch=32),
        bar=Bar("mse", full=1e-3, quick=1e-2, higher_is_better=False),
        output_kind="regression",
        activation="none",
        inputs=sine_input(SINE),
    ),
    ModelSpec(
        name="char_hello",
        seed_doc="002_3e39966ada828bcd.txt",
        description="the seed's char RNN (one-hot, hidden 8) with a correct vocabulary: "
        "'hello' -> 'elloh'",
        task="hello",
        task_args=dict(text="hello", target="elloh"),
        arch=Arch(cell="rnn", input_kind="onehot", input_size=4, hidden=8, output_size=4),
        # weight decay keeps the recurrence tame: unconstrained, this tiny RNN becomes chaotic on
        # unseen strings and float32 rounding (ORT vs torch) grows past the parity tolerance
        hyper=Hyper(lr=0.05, weight_decay=1e-2, epochs=300, patience=300, clip=5.0),
        quick=Hyper(lr=0.05, weight_decay=1e-2, epochs=150, patience=150, clip=5.0),
        bar=Bar("exact_steps", full=1.0, quick=1.0),
        output_kind="next_token",
        activation="softmax",
        inputs=InputDoc("one character id per step (index into input.vocab: h, e, l, o)"),
    ),
    ModelSpec(
        name="char",
        seed_doc="002_3e39966ada828bcd.txt",
        description="char-level GRU with embedding: next character of the Python language "
        "reference (stdlib pydoc_data.topics)",
        task="text",
        task_args=dict(seq_len=100, val_frac=0.05, test_frac=0.05),
        arch=Arch(
            cell="gru",
            input_kind="embedding",
            input_size=0,
            hidden=256,
            output_size=0,
            embedding=48,
            dropout=0.1,
        ),
        hyper=Hyper(
            lr=3e-3,
            weight_decay=1e-6,
            clip=1.0,
            batch=64,
            epochs=12,
            patience=3,
            n_train=3000,
            n_val=200,
            n_test=200,
        ),
        quick=Hyper(
            lr=5e-3, clip=1.0, batch=32, epochs=1, patience=1, n_train=600, n_val=60, n_test=60
        ),
        # loss relative to the unigram baseline's entropy (nats/char), the bar is a ratio
        bar=Bar("loss_vs_unigram", full=0.60, quick=0.90, higher_is_better=False),
        output_kind="next_token",
        activation="softmax",
        inputs=InputDoc(
            "one character id per step (index into input.vocab); trained on English prose "
            "and Python code of the Python language reference"
        ),
    ),
]

ZOO: dict[str, ModelSpec] = {m.name: m for m in ZOO_LIST}


def get(name: str) -> ModelSpec:
    try:
        return ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO)}") from None
