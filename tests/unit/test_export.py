"""Export: the artifacts follow serving/manifest.py, the three runtimes agree, the sequence graph
equals running each row alone (bidirectional included), bad input fails on one line without
leaving a half-written version behind, and the manifest's optional input description, range and
sampling are checked (and may be absent, as in stores written before them)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from serving.errors import ArtifactError
from serving.manifest import (
    MANIFEST_FILE,
    list_versions,
    load_manifest,
    resolve,
    sha256_file,
    summary_path,
)
from training import export as exporter
from training import zoo
from training.cli import main
from training.models import build, export_graph
from training.reference import load_eager
from training.train import train

ZOO = list(zoo.ZOO)
SHAPES = [(1, 1), (1, 50), (64, 1), (64, 50)]


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def load_script(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path))


def inputs_for(m, batch: int, steps: int, g: torch.Generator) -> torch.Tensor:
    if m.input.kind == "features":
        return torch.randn(batch, steps, m.input.features, generator=g)
    return torch.randint(0, len(m.input.vocab), (batch, steps), generator=g)


def garbage_padded(m, rows: list[torch.Tensor], steps: int, g: torch.Generator) -> torch.Tensor:
    """Rows right-padded with large random values (features) or random ids (tokens), not zeros:
    a graph that reads padding gives a different answer."""
    batch = inputs_for(m, len(rows), steps, g)
    if m.input.kind == "features":
        batch = batch * 50
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    return batch


def assert_close(a, b, what: str, tol: float = 1e-5) -> None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    limit = tol * max(1.0, float(np.abs(a).max()))  # export.compare's rule
    diff = float(np.abs(a - b).max())
    assert diff <= limit, f"{what}: max|diff| {diff:.3g} > {limit:.3g}"


# ---- the contract ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ZOO)
def test_manifest_follows_the_contract(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)  # schema + every sha256
    listed = set(m.files) | {MANIFEST_FILE}
    assert listed == {p.name for p in folder.iterdir()}, "unlisted or missing files"
    assert {"weights.pt", "metrics.json", "loss.png", "model.onnx", "model.pt"} <= set(m.files)
    if m.output.kind == "classification":
        assert "confusion.png" in m.files
    assert m.streamable == (name != "seq_bilstm")
    assert m.versions["torch"].startswith("2.13.0") and m.training["seed"] == 0
    for graph in m.graphs.values():
        model = onnx.load(str(folder / graph.onnx))
        assert [i.name for i in model.graph.input] == graph.inputs
        assert [o.name for o in model.graph.output] == graph.outputs
        x = model.graph.input[0].type.tensor_type.shape.dim
        assert x[0].dim_param and x[1].dim_param, "B and T must be dynamic"
    expected_states = {"lstm": ["h", "c"]}.get(m.architecture["cell"], ["h"])
    if m.streamable:
        assert [s.name for s in m.state] == expected_states
        assert m.graphs["step"].outputs == ["y", *[f"{s}_out" for s in expected_states]]
    else:
        assert m.state == [] and "step" not in m.graphs


def test_manifest_example_in_docs_is_a_real_manifest() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "manifest.md").read_text()
    example = text.split("```json", 1)[1].split("```", 1)[0]
    from serving.manifest import Manifest

    m = Manifest.from_dict(json.loads(example))
    assert m.name == "seq_lstm" and m.graphs["step"].inputs == ["x", "h", "c"]


# ---- the input's description, range and sampling --------------------------------------------
def sine_manifest(quick_store: Path) -> dict:
    return json.loads((resolve(quick_store, "sine") / MANIFEST_FILE).read_text())


def with_input(d: dict, **changes) -> dict:
    return {**d, "input": {**d["input"], **changes}}


def with_sampling(d: dict, **changes) -> dict:
    return with_input(d, sampling={**d["input"]["sampling"], **changes})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: with_input(d, description=3), "input.description must be text, got 3"),
        (lambda d: with_input(d, range=[-1, 1]), 'input.range must be {"min": number'),
        (lambda d: with_input(d, range={"min": -1}), 'input.range must be {"min": number'),
        (
            lambda d: with_input(d, range={"min": "-1", "max": 1}),
            "input.range.min must be a finite number, got '-1'",
        ),
        (
            lambda d: with_input(d, range={"min": 1, "max": -1}),
            "input.range needs min < max, got min 1 and max -1",
        ),
        (
            lambda d: with_input(d, range={"min": -1, "max": float("inf")}),
            "input.range.max must be a finite number",
        ),
        (lambda d: with_input(d, sampling={"dt": 0.1}), "input.sampling must be an object with"),
        (lambda d: with_sampling(d, dt=0), "input.sampling.dt must be a finite number > 0, got 0"),
        (lambda d: with_sampling(d, dt=True), "input.sampling.dt must be a finite number > 0"),
        (
            lambda d: with_sampling(d, angular_frequency={"min": 0, "max": 2.0}),
            "input.sampling.angular_frequency.min must be > 0",
        ),
        (
            lambda d: with_sampling(d, period_steps={"min": 10, "max": 80}),
            "input.sampling.period_steps [10, 80] does not match",
        ),
        (
            lambda d: with_input(d, kind="tokens", vocab=["a"], features=None),
            "input.range and input.sampling apply to features inputs only",
        ),
    ],
    ids=[
        "description-number",
        "range-list",
        "range-no-max",
        "range-text",
        "range-reversed",
        "range-infinite",
        "sampling-partial",
        "dt-zero",
        "dt-bool",
        "frequency-zero",
        "periods-mismatch",
        "range-on-tokens",
    ],
)
def test_a_bad_input_hint_is_an_artifact_error_naming_the_field(
    quick_store: Path, tmp_path: Path, change, message: str
) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(change(sine_manifest(quick_store))))
    with pytest.raises(ArtifactError, match=re.escape(message)):
        load_manifest(tmp_path, verify=False)


def test_a_manifest_without_input_hints_still_loads(quick_store: Path, tmp_path: Path) -> None:
    """Stores exported before the fields existed keep loading: all three are optional."""
    d = sine_manifest(quick_store)
    for key in ("description", "range", "sampling"):
        del d["input"][key]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    m = load_manifest(tmp_path, verify=False)
    assert (m.input.description, m.input.range, m.input.sampling) == ("", None, None)


def test_input_hints_round_trip_through_json(quick_store: Path) -> None:
    m = load_manifest(resolve(quick_store, "sine"))
    again = json.loads(m.to_json())["input"]
    assert again == sine_manifest(quick_store)["input"]
    assert again["range"] == {"min": -1.0, "max": 1.0}
    assert set(again["sampling"]) == {"dt", "angular_frequency", "period_steps"}


# ---- parity, checked again independently of export.check_parity ---------------------------
@pytest.mark.parametrize("name", ZOO)
def test_eager_torchscript_onnx_agree(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)
    eager, script = load_eager(folder), load_script(folder / "model.pt")
    seq = session(folder / "model.onnx")
    step = session(folder / "step.onnx") if m.streamable else None
    g = torch.Generator().manual_seed(7)
    for batch, steps in SHAPES:
        x = inputs_for(m, batch, steps, g)
        lengths = torch.randint(1, steps + 1, (batch,), generator=g)
        with torch.no_grad():
            ref = eager.sequence(x, lengths)
            assert_close(ref, script(x, lengths), f"{name} torchscript B={batch} T={steps}")
        got = seq.run(None, {m.input.name: x.numpy(), "lengths": lengths.numpy()})[0]
        assert_close(ref, got, f"{name} onnx sequence B={batch} T={steps}")
        if step is None:
            continue
        states = [0.3 * torch.randn(s.shape(batch), generator=g) for s in m.state]
        with torch.no_grad():
            ref_step = eager.step(x, *states)
            ts_step = script.step(x, *states)
        feeds = {m.input.name: x.numpy()}
        feeds.update({s.name: v.numpy() for s, v in zip(m.state, states, strict=True)})
        for r, t, o in zip(ref_step, ts_step, step.run(None, feeds), strict=True):
            assert_close(r, t, f"{name} torchscript step")
            assert_close(r, o, f"{name} onnx step")


@pytest.mark.parametrize("name", [n for n in ZOO if zoo.get(n).streamable])
def test_stepping_one_at_a_time_equals_the_whole_sequence(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)
    script = load_script(folder / "model.pt")
    x = inputs_for(m, 3, 12, torch.Generator().manual_seed(1))
    zeros = [torch.zeros(s.shape(3)) for s in m.state]
    with torch.no_grad():
        whole = script.step(x, *zeros)
        carried, ys = zeros, []
        for t in range(12):
            y, *carried = script.step(x[:, t : t + 1], *carried)
            ys.append(y)
    assert_close(whole[0], torch.cat(ys, 1), f"{name} y")
    for w, c in zip(whole[1:], carried, strict=True):
        assert_close(w, c, f"{name} state")


@pytest.mark.parametrize("name", ZOO)
def test_padded_batch_equals_each_row_alone(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)
    script, seq = load_script(folder / "model.pt"), session(folder / "model.onnx")
    eager = load_eager(folder)
    g = torch.Generator().manual_seed(11)
    lengths = [9, 1, 4, 7, 2]
    rows = [inputs_for(m, 1, n, g)[0] for n in lengths]
    batch = garbage_padded(m, rows, 9, g)
    n = torch.tensor(lengths)
    batched = seq.run(None, {m.input.name: batch.numpy(), "lengths": n.numpy()})[0]
    with torch.no_grad():
        batched_ts = script(batch, n)
        batched_eager = eager.sequence(batch, n)
    for i, row in enumerate(rows):
        alone = seq.run(None, {m.input.name: row[None].numpy(), "lengths": np.array([len(row)])})
        assert_close(alone[0][0], batched[i], f"{name} onnx row {i}")
        assert_close(alone[0][0], batched_ts[i], f"{name} torchscript row {i}")
        assert_close(alone[0][0], batched_eager[i], f"{name} eager (packed) row {i}")


def test_bidirectional_backward_direction_starts_at_each_rows_end(quick_store: Path) -> None:
    """Against nn.LSTM(bidirectional=True) run on the row alone: its backward pass starts at the
    row's last step by construction, and the head reads h_n of both directions."""
    folder = resolve(quick_store, "seq_bilstm")
    eager, script = load_eager(folder), load_script(folder / "model.pt")
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, 6, 10, generator=g)
    padded = torch.cat([row, 100 * torch.randn(1, 44, 10, generator=g)], 1)
    with torch.no_grad():
        _, (h_n, _) = eager.rnn(row)
        expected = eager.head(torch.cat([h_n[-2], h_n[-1]], -1))
        assert_close(expected, script(padded, torch.tensor([6])), "bilstm vs nn.LSTM alone")
        # without the per-row reversal, the backward direction would start in the padding
        assert not torch.allclose(expected, eager.head(eager.rnn(padded)[0][:, 5]), atol=1e-3)


# ---- bad input -------------------------------------------------------------------------------
def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    status = main(args)
    out, err = capsys.readouterr()
    return status, out, err


def test_unknown_model_name(tmp_path: Path, capsys) -> None:
    status, _, err = run_cli(["train", "nope", "--quick", "--store", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "unknown model 'nope'" in err
    assert list(tmp_path.iterdir()) == []
    status, _, err = run_cli(["export", "nope", "--store", str(tmp_path)], capsys)
    assert status == 2 and "unknown model 'nope'" in err


def test_rnnserve_and_python_m_training_dispatch_here(tmp_path: Path, capsys) -> None:
    from serving.cli import main as rnnserve

    assert rnnserve(["train", "nope", "--store", str(tmp_path)]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-m", "training", "export", "nope", "--store", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: unknown model 'nope'")


def test_unwritable_store_fails_before_any_training(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for store in (blocker / "store", blocker):
        args = ["train", "elman", "--quick", "--store", str(store), "--no-progress"]
        status, out, err = run_cli(args, capsys)
        assert status == 2 and err.count("\n") == 1 and "cannot write to store" in err, err
        assert out == "", "the store is checked before the first training run"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "epochs=1.5"], "--set epochs expects an integer, got '1.5'"),
        (["--set", "lr=abc"], "--set lr expects a number, got 'abc'"),
        (["--set", "n_train=0"], "n_train must be an integer >= 1, got 0"),
        (["--set", "batch=-3"], "batch must be an integer >= 1, got -3"),
        (["--set", "lr=nan"], "lr must be a finite number > 0"),
        (["--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
        (["--set", "=3"], "unknown hyperparameter ''"),
        (["--set", "epochs"], "--set expects KEY=VALUE"),
        (["--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
    ],
)
def test_bad_training_options_fail_on_one_line_before_training(
    tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    store = tmp_path / "store"
    args = ["train", "elman", "--quick", "--no-progress", "--store", str(store), *flags]
    status, out, err = run_cli(args, capsys)
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert out == "" and not store.exists()


def test_export_without_a_version_says_so(tmp_path: Path, capsys) -> None:
    status, _, err = run_cli(["export", "elman", "--store", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "elman has no version in" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_repeated_name_trains_once(tmp_path: Path, capsys) -> None:
    tiny = ["--set", "epochs=1", "--set", "n_train=64", "--no-progress", "--force", "--quick"]
    status, out, _ = run_cli(["train", "elman", "elman", "--store", str(tmp_path), *tiny], capsys)
    assert status in (0, 1) and out.count("elman:") == 1  # 1: one epoch may miss the bar
    assert list_versions(tmp_path, "elman") == [1]


def test_nan_loss_fails_without_a_version(tmp_path: Path, capsys) -> None:
    # an absurd learning rate blows the regression head up within a few batches
    args = ["train", "sine", "--quick", "--store", str(tmp_path), "--no-progress"]
    status, _, err = run_cli([*args, "--set", "lr=1e30"], capsys)
    assert status == 2 and err.count("\n") == 1 and "(not finite)" in err, err
    assert list_versions(tmp_path, "sine") == []
    assert not any(p.name.startswith(".tmp") for p in tmp_path.rglob("*"))


def copy_model(quick_store: Path, name: str, store: Path) -> Path:
    target = store / name / "1"
    shutil.copytree(resolve(quick_store, name), target)
    return target


def test_corrupted_artifact_is_refused(quick_store: Path, tmp_path: Path, capsys) -> None:
    folder = copy_model(quick_store, "sum_sign_rnn", tmp_path)
    weights = folder / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    status, _, err = run_cli(["export", "sum_sign_rnn", "--store", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "sha256" in err
    assert list_versions(tmp_path, "sum_sign_rnn") == [1]


def test_mismatching_weights_are_refused(quick_store: Path, tmp_path: Path, capsys) -> None:
    folder = copy_model(quick_store, "sum_sign_rnn", tmp_path)
    other = resolve(quick_store, "sum_sign_lstm") / "weights.pt"
    shutil.copy(other, folder / "weights.pt")  # valid checksum in the manifest, wrong tensors
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"]["weights.pt"] = sha256_file(folder / "weights.pt")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    status, _, err = run_cli(["export", "sum_sign_rnn", "--store", str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "does not fit the manifest" in err


def assert_same_graphs(source: Path, copy: Path) -> None:
    """Both versions' ONNX graphs give the same outputs on random input (not the same bytes:
    a re-export that loaded the wrong weights, or none, would still write valid files)."""
    m = load_manifest(source)
    g = torch.Generator().manual_seed(5)
    x, lengths = inputs_for(m, 4, 7, g), torch.tensor([7, 3, 1, 5])
    feeds = {"model.onnx": {m.input.name: x.numpy(), "lengths": lengths.numpy()}}
    states = {s.name: (0.3 * torch.randn(s.shape(4), generator=g)).numpy() for s in m.state}
    if m.streamable:
        feeds["step.onnx"] = {m.input.name: x.numpy(), **states}
    for graph, feed in feeds.items():
        for a, b in zip(
            session(source / graph).run(None, feed),
            session(copy / graph).run(None, feed),
            strict=True,
        ):
            assert_close(a, b, f"re-exported {graph}", tol=0.0)


def test_reexport_from_checkpoint_and_skip_existing(quick_store, tmp_path, capsys) -> None:
    source = copy_model(quick_store, "elman", tmp_path)
    status, out, _ = run_cli(["export", "elman", "--store", str(tmp_path)], capsys)
    assert status == 0 and list_versions(tmp_path, "elman") == [1, 2]
    new = load_manifest(tmp_path / "elman" / "2")
    assert_same_graphs(source, tmp_path / "elman" / "2")
    assert new.files["weights.pt"] == load_manifest(source).files["weights.pt"]
    assert (
        new.training["exported_from_version"] == 1 and new.metrics == load_manifest(source).metrics
    )
    assert f"summary of {tmp_path}: {summary_path(tmp_path)}" in out
    assert summary_path(tmp_path).read_bytes()[:4] == b"\x89PNG"
    status, out, _ = run_cli(["train", "elman", "--quick", "--store", str(tmp_path)], capsys)
    assert status == 0 and "[1/1] elman: already in" in out and "skipped" in out
    assert list_versions(tmp_path, "elman") == [1, 2]


def test_broken_parity_leaves_no_version(tmp_path: Path, monkeypatch) -> None:
    spec = zoo.get("elman").with_overrides({"epochs": 1, "n_train": 64}, quick=True)
    trained = train(spec, quick=True)
    monkeypatch.setattr(exporter, "TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(exporter.ExportError, match="parity broken"):
        exporter.export(exporter.Artifact.from_trained(trained), tmp_path)
    assert [p.name for p in (tmp_path / "elman").iterdir()] == []  # no version, no temp folder


def test_export_graph_of_untrained_models_matches_eager() -> None:
    """Every zoo architecture (random weights) exports to a graph equal to its eager model."""
    g = torch.Generator().manual_seed(0)
    for spec in zoo.ZOO_LIST:
        arch = (
            spec.arch if spec.arch.input_size else replace(spec.arch, input_size=7, output_size=7)
        )
        model = build(arch).eval()
        graph = export_graph(model)
        x = (
            torch.randn(3, 5, arch.input_size, generator=g)
            if arch.input_kind == "features"
            else torch.randint(0, arch.input_size, (3, 5), generator=g)
        )
        n = torch.tensor([5, 2, 1])
        with torch.no_grad():
            assert_close(model.sequence(x, n), graph(x, n), spec.name)


def test_the_next_version_counts_only_folders_named_by_ascii_digits(tmp_path):
    for folder in ("1", "²", "3", "notes"):  # "²" passes str.isdigit, and int() refuses it
        (tmp_path / folder).mkdir()
    assert exporter.next_version(tmp_path) == 4
