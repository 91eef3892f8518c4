"""The contract between training and serving: the artifact folder and its manifest.

A model version lives in ``<store>/<name>/<version>/`` (version is a positive integer) and holds
``manifest.json`` plus the files it lists. Training writes it (``training/export.py``); serving and
the TorchServe handler only read it. Nothing here imports torch.

Graph conventions (every graph exists in ONNX and TorchScript form):

* ``step`` (streamable models only):
  ``(x[B,T,F] float32 | tokens[B,T] int64, *states[L,B,H]) -> (y[B,T,O], *states_out[L,B,H])``.
  States follow PyTorch's layout ``(num_layers * directions, batch, hidden)``; batching stacks on
  dim 1. Output ``i`` after ``y`` is the new value of ``state[i]``.
* ``sequence`` (every model):
  ``(x[B,T,F] | tokens[B,T], lengths[B] int64) -> y[B,O]``: the output after the last valid step of
  each right-padded row, equal to running that row alone.

``y`` holds the head's raw output; ``output.activation`` says how to read it as probabilities.
See docs/manifest.md for the schema with an example.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from serving.errors import ArtifactError, ModelNotFound, VersionNotFound

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SUMMARY_FILE = "summary.png"  # in the store's root: every model's metric against its bar

InputKind = Literal["features", "tokens"]
OutputKind = Literal["classification", "regression", "next_token"]
Activation = Literal["softmax", "sigmoid", "log_softmax", "none"]


@dataclass(frozen=True)
class ValueRange:
    min: float
    max: float


@dataclass(frozen=True)
class Sampling:
    """How a features input samples a periodic signal in time: the grid the model was trained on.

    A series sampled on another grid (another dt), or of a frequency outside the range, is a
    signal the model never saw; ``period_steps`` is the same range counted in steps per cycle.
    """

    dt: float  # time between consecutive steps
    angular_frequency: ValueRange  # w of sin(w t + phase), radians per unit of time
    period_steps: ValueRange  # 2 pi / (w dt): steps per cycle, for the same range of w


@dataclass(frozen=True)
class InputSpec:
    kind: InputKind
    name: str  # graph input name: "x" for features, "tokens" for token ids
    features: int | None = None  # F, for kind == "features"
    vocab: list[str] | None = None  # index -> character, for kind == "tokens"
    max_steps: int = 1024  # longest sequence one request may carry
    description: str = ""  # what one step's input is, in words
    range: ValueRange | None = None  # features: every value training fed lies in [min, max]
    sampling: Sampling | None = None  # features sampled from a signal in time (sine)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        values = dict(d)
        values["range"] = value_range(values.get("range"), "input.range")
        sampling = values.get("sampling")
        if sampling is not None:
            if not isinstance(sampling, dict) or set(sampling) != SAMPLING_KEYS:
                raise ValueError(
                    f"input.sampling must be an object with {', '.join(sorted(SAMPLING_KEYS))}, "
                    f"got {sampling!r}"
                )
            values["sampling"] = Sampling(
                sampling["dt"],
                value_range(sampling["angular_frequency"], "input.sampling.angular_frequency"),
                value_range(sampling["period_steps"], "input.sampling.period_steps"),
            )
        return cls(**values)

    def hint_problems(self) -> list[str]:
        """What is wrong with the optional description, range and sampling (empty: nothing)."""
        problems = []
        if not isinstance(self.description, str):
            problems.append(f"input.description must be text, got {self.description!r}")
        if self.kind != "features" and (self.range or self.sampling):
            problems.append("input.range and input.sampling apply to features inputs only")
        if self.range is not None:
            problems += range_problems(self.range, "input.range")
        if self.sampling is not None:
            problems += sampling_problems(self.sampling)
        return problems


SAMPLING_KEYS = {"dt", "angular_frequency", "period_steps"}


def value_range(value: Any, where: str) -> ValueRange | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"min", "max"}:
        raise ValueError(f'{where} must be {{"min": number, "max": number}}, got {value!r}')
    return ValueRange(value["min"], value["max"])


def is_finite_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def range_problems(r: ValueRange, where: str) -> list[str]:
    for end in ("min", "max"):
        if not is_finite_number(getattr(r, end)):
            return [f"{where}.{end} must be a finite number, got {getattr(r, end)!r}"]
    if not r.min < r.max:
        return [f"{where} needs min < max, got min {r.min!r} and max {r.max!r}"]
    return []


def sampling_problems(s: Sampling) -> list[str]:
    if not (is_finite_number(s.dt) and s.dt > 0):
        return [f"input.sampling.dt must be a finite number > 0, got {s.dt!r}"]
    w, period = s.angular_frequency, s.period_steps
    problems = range_problems(w, "input.sampling.angular_frequency")
    problems += range_problems(period, "input.sampling.period_steps")
    if problems:
        return problems
    if w.min <= 0:
        return [f"input.sampling.angular_frequency.min must be > 0, got {w.min!r}"]
    # the two ranges describe one set of signals: a mismatch means one of them was edited
    expected = (2 * math.pi / (w.max * s.dt), 2 * math.pi / (w.min * s.dt))
    stated = (period.min, period.max)
    if not all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(stated, expected, strict=True)):
        return [
            f"input.sampling.period_steps [{period.min:g}, {period.max:g}] does not match "
            f"2 pi / (angular_frequency * dt) = [{expected[0]:g}, {expected[1]:g}]"
        ]
    return []


@dataclass(frozen=True)
class OutputSpec:
    kind: OutputKind
    size: int  # O: last dim of y
    activation: Activation
    labels: list[str] | None = None  # classification: index -> label
    vocab: list[str] | None = None  # next_token: index -> character


@dataclass(frozen=True)
class StateSpec:
    name: str  # graph input name; the step graph outputs its new value as f"{name}_out"
    layers: int  # num_layers * directions
    size: int  # hidden size
    dtype: str = "float32"
    init: float = 0.0

    def shape(self, batch: int) -> tuple[int, int, int]:
        return (self.layers, batch, self.size)


@dataclass(frozen=True)
class GraphSpec:
    onnx: str  # file name in the version folder
    torchscript: str  # file name in the version folder
    method: str  # TorchScript method to call ("forward" or "step")
    inputs: list[str]
    outputs: list[str]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    task: str  # human words: "sum of a sequence > 0", "next character", ...
    input: InputSpec
    output: OutputSpec
    state: list[StateSpec]
    streamable: bool
    graphs: dict[str, GraphSpec]  # "sequence" always, "step" when streamable
    files: dict[str, str]  # file name -> sha256 hex
    schema_version: int = SCHEMA_VERSION
    description: str = ""
    seed: str = ""  # which tutorial in shared/seeds it comes from
    architecture: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise ArtifactError(f"a manifest is a JSON object, got {type(d).__name__}")
        try:
            if d.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"schema_version {d.get('schema_version')!r} != {SCHEMA_VERSION}")
            m = cls(
                **{
                    **d,
                    "input": InputSpec.from_dict(d["input"]),
                    "output": OutputSpec(**d["output"]),
                    "state": [StateSpec(**s) for s in d["state"]],
                    "graphs": {k: GraphSpec(**g) for k, g in d["graphs"].items()},
                }
            )
            m.check()  # inside: a field of the wrong type ("version": "1") fails in the checks
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest does not follow schema v{SCHEMA_VERSION}: {e}") from e
        return m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def check(self) -> None:
        """Internal consistency; raises ArtifactError naming the first problem."""
        problems = []
        if self.version < 1:
            problems.append(f"version must be >= 1, got {self.version}")
        if self.input.kind == "features" and not self.input.features:
            problems.append("features input needs input.features")
        steps = self.input.max_steps
        if type(steps) is not int or steps < 1:  # the engine sizes its start-up timing with it
            problems.append(f"input.max_steps must be a positive integer, got {steps!r}")
        if self.input.kind == "tokens" and not self.input.vocab:
            problems.append("tokens input needs input.vocab")
        problems += self.input.hint_problems()
        if self.output.kind == "classification" and not self.output.labels:
            problems.append("classification output needs output.labels")
        if "sequence" not in self.graphs:
            problems.append("every model needs a 'sequence' graph")
        if self.streamable != ("step" in self.graphs):
            problems.append("a 'step' graph exists exactly when the model is streamable")
        for g in self.graphs.values():
            for f in (g.onnx, g.torchscript):
                if f not in self.files:
                    problems.append(f"graph file {f} has no sha256 in files")
        if problems:
            raise ArtifactError(f"{self.name} v{self.version}: " + "; ".join(problems))

    # ---- convenience ---------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return self.output.labels or self.output.vocab or []

    def state_bytes(self) -> int:
        """Raw bytes of one session's state (float32)."""
        return sum(4 * s.layers * s.size for s in self.state)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(version_dir: Path, verify: bool = True) -> Manifest:
    """Read ``version_dir/manifest.json``; with ``verify``, check every listed file's sha256."""
    version_dir = Path(version_dir)
    path = version_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: no manifest") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from e
    m = Manifest.from_dict(data)
    if verify:
        verify_files(m, version_dir)
    return m


def verify_files(m: Manifest, version_dir: Path) -> None:
    for name, expected in m.files.items():
        f = version_dir / name
        if not f.is_file():
            raise ArtifactError(f"{m.name} v{m.version}: {name} is listed but missing")
        actual = sha256_file(f)
        if actual != expected:
            raise ArtifactError(
                f"{m.name} v{m.version}: {name} sha256 {actual[:12]}… != manifest {expected[:12]}…"
            )


def is_version_name(folder: str) -> bool:
    """A version folder's name: a number from 1 to 2**32 - 1 as written, in ASCII digits without
    leading zeros ("²" passes ``str.isdigit`` and ``int`` refuses it; "007" names version 7,
    whose folder ``resolve`` looks for as "7"; the core keeps versions in 32 bits)."""
    return (
        folder.isascii()
        and folder.isdigit()
        and folder == str(int(folder))
        and 1 <= int(folder) < 2**32
    )


def list_versions(store: Path, name: str) -> list[int]:
    """The versions of a model in the store: its version folders that hold a manifest."""
    d = Path(store) / name
    if not d.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in d.iterdir()
        if is_version_name(p.name) and (p / MANIFEST_FILE).is_file()
    )


def list_models(store: Path) -> list[str]:
    """Model names in the store (folders holding at least one complete version)."""
    store = Path(store)
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if p.is_dir() and list_versions(store, p.name))


def resolve(store: Path, name: str, version: int | None = None) -> Path:
    """The folder of ``name`` at ``version`` (latest when None)."""
    versions = list_versions(store, name)
    if not versions:
        raise ModelNotFound(
            f"unknown model {name!r}; the store has: {', '.join(list_models(store))}"
        )
    if version is None:
        version = versions[-1]
    if version not in versions:
        raise VersionNotFound(
            f"model {name!r} has no version {version}; it has: {', '.join(map(str, versions))}"
        )
    return Path(store) / name / str(version)


def summary_path(store: Path) -> Path:
    """Where ``rnnserve train`` and ``rnnserve export`` draw the store's training summary (every
    model's held-out metric against its quality bar); absent until one of them ran."""
    return Path(store) / SUMMARY_FILE
