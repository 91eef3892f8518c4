"""Export a trained model into ``<store>/<name>/<version>/``: the contract of serving/manifest.py.

Files: ``model.onnx`` (sequence graph), ``step.onnx`` (step graph, streamable models only),
``model.pt`` (TorchScript: ``forward`` = sequence, ``step`` = step), ``weights.pt`` (the eager
state_dict), ``metrics.json``, PNG plots and ``manifest.json`` (written last, with every file's
sha256). Everything is written into a temporary folder inside the store and renamed into place at
the end, after the parity checks pass, so a version folder is either complete or absent.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from serving.errors import ArtifactError
from serving.manifest import (
    MANIFEST_FILE,
    GraphSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    Sampling,
    StateSpec,
    ValueRange,
    is_version_name,
    load_manifest,
    sha256_file,
)
from training.data import TASK_WORDS
from training.models import (
    ElmanRNN,
    RecurrentNet,
    StepAsForward,
    build,
    export_graph,
    state_layers,
    state_names,
)
from training.train import Trained, write_plots
from training.zoo import Arch, InputDoc, ModelSpec, period_steps

OPSET = 17
TOLERANCE = 1e-5
PARITY_SHAPES = [(1, 1), (1, 50), (64, 1), (64, 50)]  # (B, T)


class ExportError(RuntimeError):
    """The export cannot produce a trustworthy version (parity broken, store unwritable...)."""


@dataclass
class Artifact:
    """Everything a version folder is written from (a fresh training run or a checkpoint)."""

    spec: ModelSpec
    arch: Arch
    model: nn.Module
    metrics: dict[str, Any]
    history: dict[str, list[float]]
    vocab: list[str] | None
    training: dict[str, Any]

    @classmethod
    def from_trained(cls, t: Trained) -> Artifact:
        training = {
            "seed": t.seed,
            "quick": t.quick,
            "hyper": asdict(t.spec.hyper_for(t.quick)),
            "task_args": t.spec.task_args,
            "seconds": round(t.seconds, 2),
            "optimizer": "Adam",
        }
        return cls(t.spec, t.arch, t.model.eval(), t.metrics, t.history, t.data.vocab, training)


# ---- the version folder -------------------------------------------------------------------
def next_version(model_dir: Path) -> int:
    """One past every version folder, with a manifest or not (one being written)."""
    taken = [int(p.name) for p in model_dir.iterdir() if is_version_name(p.name)]
    return max(taken, default=0) + 1


def writable_dir(store: Path, name: str = "") -> Path:
    """``store/name``, created and proven to take files (a folder may exist yet refuse writes)."""
    folder = Path(store) / name
    if folder.exists() and not folder.is_dir():
        raise ExportError(f"cannot write to store {store}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as e:
        raise ExportError(f"cannot write to store {store}: {e.strerror or e}") from e
    return folder


def export(artifact: Artifact, store: Path) -> Path:
    """Write a new version of ``artifact.spec.name`` into ``store``; returns its folder."""
    model_dir = writable_dir(store, artifact.spec.name)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=model_dir))
    try:
        version = next_version(model_dir)
        write_version(artifact, tmp, version)
        tmp.chmod(0o755)  # mkdtemp makes it private; servers may run as another user
        final = model_dir / str(version)
        tmp.rename(final)  # atomic: readers see the whole folder or nothing
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_version(artifact: Artifact, folder: Path, version: int) -> None:
    model = artifact.model.eval()
    torch.save(model.state_dict(), folder / "weights.pt")
    graph = export_graph(model)
    graphs = write_graphs(artifact, graph, folder)
    if model.training or graph.training:
        raise ExportError("the model left eval mode during export")
    parity = check_parity(artifact, model, folder)
    hyper = artifact.training.get("hyper", {})
    plots = write_plots(artifact.spec, artifact.history, artifact.metrics, hyper, folder)
    metrics = {**artifact.metrics, "history": artifact.history}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    files = [
        "weights.pt",
        "metrics.json",
        *plots,
        *sorted({f for g in graphs.values() for f in (g.onnx, g.torchscript)}),
    ]
    manifest = build_manifest(artifact, version, graphs, files, folder, parity)
    (folder / MANIFEST_FILE).write_text(manifest.to_json())
    load_manifest(folder)  # read back exactly as serving will: schema and checksums


# ---- graphs -------------------------------------------------------------------------------
def input_name(arch: Arch) -> str:
    return "x" if arch.input_kind == "features" else "tokens"


def example_inputs(arch: Arch, batch: int, steps: int, g: torch.Generator) -> Tensor:
    if arch.input_kind == "features":
        return torch.randn(batch, steps, arch.input_size, generator=g)
    return torch.randint(0, arch.input_size, (batch, steps), generator=g)


def write_graphs(artifact: Artifact, graph: nn.Module, folder: Path) -> dict[str, GraphSpec]:
    arch, name = artifact.arch, input_name(artifact.arch)
    g = torch.Generator().manual_seed(0)
    x, lengths = example_inputs(arch, 2, 3, g), torch.tensor([3, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is what serving loads
        torch.jit.script(graph).save(str(folder / "model.pt"))
    onnx_export(
        graph,
        (x, lengths),
        [name, "lengths"],
        ["y"],
        folder / "model.onnx",
        {name: {0: "batch", 1: "steps"}, "lengths": {0: "batch"}, "y": {0: "batch"}},
    )
    graphs = {"sequence": GraphSpec("model.onnx", "model.pt", "forward", [name, "lengths"], ["y"])}
    if artifact.spec.streamable:
        states = state_names(arch)
        outs = ["y", *[f"{s}_out" for s in states]]
        zeros = [torch.zeros(state_layers(arch), 2, arch.hidden) for _ in states]
        axes = {name: {0: "batch", 1: "steps"}, "y": {0: "batch", 1: "steps"}}
        axes.update({s: {1: "batch"} for s in [*states, *outs[1:]]})
        # eval() matters: the exporter restores the wrapper's mode afterwards, recursively, and a
        # fresh module is in training mode (dropout would switch on in the shared layers)
        step = StepAsForward(graph).eval()
        onnx_export(step, (x, *zeros), [name, *states], outs, folder / "step.onnx", axes)
        graphs["step"] = GraphSpec("step.onnx", "model.pt", "step", [name, *states], outs)
    return graphs


def onnx_export(
    module: nn.Module,
    args: tuple[Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    path: Path,
    axes: dict[str, dict[int, str]],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on RNNs with batch_first
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


# ---- parity -------------------------------------------------------------------------------
def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the machine is shared; parity needs no speed
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def max_diff(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def compare(report: dict[str, float], what: str, ref, other) -> None:
    """max|diff| <= 1e-5, scaled up by the reference's magnitude where it exceeds 1: float32
    kernels that sum in another order differ by a few ulps of the value (an LSTM's cell state
    can reach tens), so a purely absolute 1e-5 would flag rounding, not bugs."""
    diff = max_diff(ref, other)
    limit = TOLERANCE * max(1.0, float(np.max(np.abs(np.asarray(ref, dtype=np.float64)))))
    report[what] = max(report.get(what, 0.0), diff)
    if not diff <= limit:  # NaN fails too
        raise ExportError(f"parity broken: {what} max|diff| {diff:.3g} > {limit:.3g}")


def padded_batch(arch: Arch, batch: int, steps: int, g: torch.Generator):
    """Random rows of random lengths (the first one full), padded with garbage."""
    x = example_inputs(arch, batch, steps, g)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    return x, lengths


@torch.no_grad()
def check_parity(artifact: Artifact, model: nn.Module, folder: Path) -> dict[str, float]:
    """eager vs TorchScript vs ONNX Runtime, and step-by-step vs whole; raises ExportError."""
    arch, name = artifact.arch, input_name(artifact.arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        script = torch.jit.load(str(folder / "model.pt"))
    seq_ort = ort_session(folder / "model.onnx")
    step_ort = ort_session(folder / "step.onnx") if artifact.spec.streamable else None
    g, report = torch.Generator().manual_seed(1234), {}
    for batch, steps in PARITY_SHAPES:
        x, lengths = padded_batch(arch, batch, steps, g)
        ref = model.sequence(x, lengths)
        compare(report, "sequence torchscript", ref, script(x, lengths))
        compare(
            report,
            "sequence onnx",
            ref,
            seq_ort.run(None, {name: x.numpy(), "lengths": lengths.numpy()})[0],
        )
        if step_ort is not None:
            check_step_parity(model, script, step_ort, arch, x, lengths, ref, g, report)
    return report


def check_step_parity(
    model: nn.Module,
    script: torch.jit.ScriptModule,
    step_ort: ort.InferenceSession,
    arch: Arch,
    x: Tensor,
    lengths: Tensor,
    seq_ref: Tensor,
    g: torch.Generator,
    report: dict[str, float],
) -> None:
    name, names = input_name(arch), state_names(arch)
    states = [
        0.5 * torch.randn(state_layers(arch), x.shape[0], arch.hidden, generator=g) for _ in names
    ]
    ref = model.step(x, *states)
    feeds = {name: x.numpy(), **{s: v.numpy() for s, v in zip(names, states, strict=True)}}
    for what, outs in (
        ("step torchscript", script.step(x, *states)),
        ("step onnx", step_ort.run(None, feeds)),
    ):
        for i, (r, o) in enumerate(zip(ref, outs, strict=True)):
            compare(report, f"{what} output {i}", r, o)
    # one step at a time, carrying the state, equals the whole sequence at once
    carried = [s.numpy() for s in states]
    for t in range(x.shape[1]):
        y, *carried = step_ort.run(
            None, {name: x[:, t : t + 1].numpy(), **dict(zip(names, carried, strict=True))}
        )
        compare(report, "step-by-step vs whole: y", ref[0][:, t : t + 1], y)
    for i, c in enumerate(carried):
        compare(report, "step-by-step vs whole: state", ref[1 + i], c)
    # the sequence graph is the step graph from zero state, read at each row's last valid step
    y0 = model.step(x, *[torch.zeros_like(s) for s in states])[0]  # (B, T, O)
    compare(report, "sequence vs step at lengths-1", seq_ref, y0[torch.arange(len(x)), lengths - 1])


# ---- manifest -----------------------------------------------------------------------------
def versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "opset": str(OPSET),
    }


def sampling(doc: InputDoc) -> Sampling | None:
    if doc.dt is None or doc.angular_frequency is None:
        return None
    w_min, w_max = doc.angular_frequency
    periods = ValueRange(
        round(period_steps(w_max, doc.dt), 2), round(period_steps(w_min, doc.dt), 2)
    )
    return Sampling(doc.dt, ValueRange(w_min, w_max), periods)


def build_manifest(
    artifact: Artifact,
    version: int,
    graphs: dict[str, GraphSpec],
    files: list[str],
    folder: Path,
    parity: dict[str, float],
) -> Manifest:
    spec, arch = artifact.spec, artifact.arch
    tokens = arch.input_kind != "features"
    state = (
        [StateSpec(s, state_layers(arch), arch.hidden) for s in state_names(arch)]
        if spec.streamable
        else []
    )
    scalars = {k: v for k, v in artifact.metrics.items() if isinstance(v, int | float | str | bool)}
    return Manifest(
        name=spec.name,
        version=version,
        task=TASK_WORDS[spec.task],
        input=InputSpec(
            "tokens" if tokens else "features",
            input_name(arch),
            features=None if tokens else arch.input_size,
            vocab=artifact.vocab if tokens else None,
            max_steps=spec.max_steps,
            description=spec.inputs.description,
            range=ValueRange(*spec.inputs.range) if spec.inputs.range else None,
            sampling=sampling(spec.inputs),
        ),
        output=OutputSpec(
            spec.output_kind,
            arch.output_size,
            spec.activation,
            labels=spec.labels,
            vocab=artifact.vocab if spec.output_kind == "next_token" else None,
        ),
        state=state,
        streamable=spec.streamable,
        graphs=graphs,
        files={f: sha256_file(folder / f) for f in files},
        description=spec.description,
        seed=spec.seed_doc,
        architecture=asdict(arch),
        versions=versions(),
        training={**artifact.training, "parity_max_abs_diff": parity},
        metrics=scalars,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


# ---- re-export from a checkpoint ----------------------------------------------------------
def load_model(version_dir: Path) -> tuple[Manifest, Arch, RecurrentNet | ElmanRNN]:
    """The eager model of an exported version, from manifest.architecture + weights.pt."""
    manifest = load_manifest(version_dir)  # verifies every sha256: corrupt files stop here
    arch = arch_from_manifest(manifest)
    model = build(arch)
    try:
        model.load_state_dict(torch.load(version_dir / "weights.pt", weights_only=True))
    except (RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise ArtifactError(f"{version_dir}/weights.pt does not fit the manifest: {first}") from e
    return manifest, arch, model.eval()


def load_checkpoint(version_dir: Path, spec: ModelSpec) -> Artifact:
    """An exported version as an ``Artifact`` again, ready to be written as a new version."""
    manifest, arch, model = load_model(version_dir)
    metrics = json.loads((version_dir / "metrics.json").read_text())
    history = metrics.pop("history", {"train_loss": [], "val_loss": []})
    training = {**manifest.training, "exported_from_version": manifest.version}
    training.pop("parity_max_abs_diff", None)
    return Artifact(spec, arch, model, metrics, history, manifest.input.vocab, training)


def arch_from_manifest(manifest: Manifest) -> Arch:
    known = {f.name for f in fields(Arch)}
    try:
        return Arch(**{k: v for k, v in manifest.architecture.items() if k in known})
    except TypeError as e:
        raise ArtifactError(f"{manifest.name} v{manifest.version}: bad architecture: {e}") from e
