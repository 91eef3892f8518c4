"""Training: every model passes its (quick) bar on held-out data, read through the exported ONNX
graphs; same seed -> same model; the Elman cell is an nn.RNN; char_hello is exact."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from serving.manifest import Manifest, load_manifest, resolve
from training import data as tasks
from training import zoo
from training.models import ElmanRNN, HiddenGraph
from training.reference import load_eager
from training.train import train
from training.zoo import Arch, Hyper

QUICK_ZOO = list(zoo.ZOO)


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def held_out(manifest: Manifest) -> tasks.TaskData:
    """The test split the model never trained on, regenerated from the manifest alone."""
    hp = Hyper(**manifest.training["hyper"])
    spec = zoo.get(manifest.name)
    return tasks.build(spec.task, spec.task_args, manifest.training["seed"], 8, 8, hp.n_test)


def run_steps(folder: Path, m: Manifest, inputs: np.ndarray) -> np.ndarray:
    """The step graph over whole rows from the initial state: y (B, T, O)."""
    feeds = {m.input.name: inputs}
    feeds.update({s.name: np.full(s.shape(len(inputs)), s.init, np.float32) for s in m.state})
    return session(folder / m.graphs["step"].onnx).run(["y"], feeds)[0]


def run_sequence(folder: Path, m: Manifest, inputs: np.ndarray, lengths: np.ndarray):
    feeds = {m.input.name: inputs, "lengths": lengths}
    return session(folder / m.graphs["sequence"].onnx).run(["y"], feeds)[0]


def predicted(m: Manifest, y: np.ndarray) -> np.ndarray:
    return (y[..., 0] > 0).astype(np.int64) if m.output.activation == "sigmoid" else y.argmax(-1)


def onnx_metric(folder: Path, m: Manifest) -> float:
    """The bar's metric, recomputed through ONNX Runtime on regenerated held-out data."""
    data, spec = held_out(m), zoo.get(m.name)
    test = data.test
    x = test.inputs.numpy()
    if data.mode == "last":
        y = run_sequence(folder, m, x, test.lengths.numpy())
        return float((predicted(m, y) == test.targets.numpy()).mean())
    y = run_steps(folder, m, x)
    if spec.task == "sine":
        w = spec.task_args["warmup"]
        return float(((y[:, w:, 0] - test.targets.numpy()[:, w:]) ** 2).mean())
    if spec.task == "text":
        logits = torch.from_numpy(y).reshape(-1, y.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits, test.targets.reshape(-1))
        return float(loss) / float(data.info["unigram_loss"])
    return float((predicted(m, y) == test.targets.numpy()).mean())  # per-step labels


@pytest.mark.parametrize("name", QUICK_ZOO)
def test_quick_model_passes_its_bar_through_onnx(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)
    bar = zoo.get(name).bar
    value = onnx_metric(folder, m)
    assert bar.passes(value, quick=True), f"{name}: {bar.metric} {value:.4g}, bar {bar.quick}"
    assert value == pytest.approx(m.metrics[bar.metric], rel=1e-3, abs=1e-5)  # as trained


@pytest.mark.parametrize(
    "name", ["sum_sign_rnn", "sum_sign_lstm", "seq_lstm", "seq_gru", "seq_bilstm"]
)
def test_classifiers_answer_variable_length_rows(quick_store: Path, name: str) -> None:
    folder = resolve(quick_store, name)
    m = load_manifest(folder)
    spec = zoo.get(name)
    rows = tasks.variable_length_test(spec.task, spec.task_args, seed=99, n=500)
    assert rows is not None and int(rows.lengths.min()) < int(rows.lengths.max())
    y = run_sequence(folder, m, rows.inputs.numpy(), rows.lengths.numpy())
    accuracy = float((predicted(m, y) == rows.targets.numpy()).mean())
    assert accuracy >= 0.85, f"{name} on rows of varying length: {accuracy:.3f}"


def test_char_hello_exact_every_step_through_onnx(quick_store: Path) -> None:
    folder = resolve(quick_store, "char_hello")
    m = load_manifest(folder)
    vocab = m.input.vocab
    assert vocab == ["h", "e", "l", "o"]  # one index per character: 'l' only once
    tokens = np.array([[vocab.index(c) for c in "hello"]], dtype=np.int64)
    whole = "".join(vocab[i] for i in run_steps(folder, m, tokens).argmax(-1)[0])
    assert whole == "elloh"
    step = session(folder / "step.onnx")
    h, out = np.zeros(m.state[0].shape(1), np.float32), ""
    for t in range(5):  # one character per call, the state carried by the caller
        y, h = step.run(None, {"tokens": tokens[:, t : t + 1], "h": h})
        out += vocab[int(y[0, 0].argmax())]
    assert out == "elloh"


def test_char_model_reports_samples_and_beats_unigram(quick_store: Path) -> None:
    m = load_manifest(resolve(quick_store, "char"))
    assert m.metrics["loss"] < m.metrics["unigram_loss"]
    assert m.input.vocab == sorted(set(tasks.corpus()))
    metrics = json.loads((resolve(quick_store, "char") / "metrics.json").read_text())
    assert len(metrics["samples"]) == 3 and all(len(s) > 100 for s in metrics["samples"])


def test_sine_forecast_plotted(quick_store: Path) -> None:
    folder = resolve(quick_store, "sine")
    m = load_manifest(folder)
    assert "forecast.png" in m.files and (folder / "forecast.png").stat().st_size > 1000
    assert m.metrics["forecast_mse_50"] < 0.5  # 50 steps fed back on themselves stay on track


def test_same_seed_same_model_different_seed_different_model() -> None:
    spec = zoo.get("sum_sign_rnn").with_overrides({"epochs": 2, "n_train": 600}, quick=True)
    a, b = (train(spec, seed=5, quick=True, progress=False) for _ in range(2))
    c = train(spec, seed=6, quick=True, progress=False)
    assert a.metrics == b.metrics
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert not torch.equal(a.model.rnn.weight_hh_l0, c.model.rnn.weight_hh_l0)


def test_elman_cell_equals_nn_rnn_with_the_same_weights() -> None:
    torch.manual_seed(0)
    cell = ElmanRNN(
        Arch(
            cell="elman",
            input_kind="features",
            input_size=3,
            hidden=16,
            output_size=2,
            log_softmax=True,
        )
    ).eval()
    rnn = cell.to_rnn()
    x = torch.randn(4, 9, 3)  # (B, T, F)
    with torch.no_grad():
        hidden, seed_outputs = cell.init_hidden(4), []
        for t in range(9):  # the seed's own loop: one step, carried hidden
            y, hidden = cell(x[:, t], hidden)
            seed_outputs.append(y)
        y_rnn, h_rnn = HiddenGraph(rnn).step(x, torch.zeros(1, 4, 16))
    torch.testing.assert_close(y_rnn, torch.stack(seed_outputs, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(h_rnn[0], hidden, atol=1e-6, rtol=0)
    assert torch.count_nonzero(rnn.rnn.bias_hh_l0) == 0


def test_trained_elman_equals_its_exported_nn_rnn(quick_store: Path) -> None:
    folder = resolve(quick_store, "elman")
    cell = load_eager(folder)
    assert isinstance(cell, ElmanRNN)  # the reference is the hand-written cell itself
    x = torch.randn(8, 20, 1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_cell, h_cell = cell.step(x, *cell.init_states(8))
    y_onnx = run_steps(folder, load_manifest(folder), x.numpy())
    np.testing.assert_allclose(y_onnx, y_cell.numpy(), atol=1e-5, rtol=0)
    assert asdict(load_manifest(folder).state[0])["layers"] == 1 and h_cell.shape == (1, 8, 32)
