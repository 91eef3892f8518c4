"""Training: every model passes its (quick) bar on held-out data, read through the exported ONNX
graphs; same seed -> same model; the Elman cell is an nn.RNN; char_hello is exact; the sine
manifest states the grid its data was sampled on; plots say what a reader needs; progress is one
line per epoch off a terminal."""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from matplotlib.colors import to_rgb

from serving.manifest import Manifest, load_manifest, resolve
from training import data as tasks
from training import plots, zoo
from training.models import ElmanRNN, HiddenGraph
from training.progress import Progress, RunEstimate, epoch_seconds
from training.reference import load_eager
from training.train import Epoch, train
from training.zoo import Arch, Hyper

ROOT = Path(__file__).resolve().parents[2]

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
    a, b = (train(spec, seed=5, quick=True) for _ in range(2))
    c = train(spec, seed=6, quick=True)
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


# ---- the sine model's inputs in the manifest ---------------------------------------------------
def test_sine_manifest_states_the_grid_and_range_its_training_data_had(quick_store: Path) -> None:
    """Each training series is a pure sinusoid, so x[t-1] + x[t+1] = 2 cos(w dt) x[t] gives its
    w dt from the data alone; the manifest's dt and frequency range must cover what was fed."""
    m = load_manifest(resolve(quick_store, "sine"))
    hint = m.input.sampling
    assert hint is not None and m.input.range is not None and "dt" in m.input.description
    spec = zoo.get("sine")
    series = tasks.build("sine", spec.task_args, 0, 400, 1, 1).train.inputs[..., 0].double()
    x = series.numpy()
    middle = np.abs(x[:, 1:-1]) > 0.3  # away from zero crossings, the ratio is well conditioned
    ratio = (x[:, :-2] + x[:, 2:]) / (2 * np.where(middle, x[:, 1:-1], 1.0))
    w_dt = np.array([np.arccos(np.median(r[k])) for r, k in zip(ratio, middle, strict=True)])
    w = w_dt / hint.dt
    span = hint.angular_frequency.max - hint.angular_frequency.min
    assert hint.angular_frequency.min - 1e-3 <= w.min() < hint.angular_frequency.min + 0.05 * span
    assert hint.angular_frequency.max - 0.05 * span < w.max() <= hint.angular_frequency.max + 1e-3
    periods = 2 * math.pi / w_dt  # steps per cycle, counted from the data
    assert (
        hint.period_steps.min - 0.1 <= periods.min()
        and periods.max() <= hint.period_steps.max + 0.1
    )
    assert m.input.range.min <= x.min() and x.max() <= m.input.range.max
    assert x.min() < m.input.range.min + 0.01 and x.max() > m.input.range.max - 0.01


def test_every_model_describes_its_input(quick_store: Path) -> None:
    for name in zoo.ZOO:
        m = load_manifest(resolve(quick_store, name))
        assert len(m.input.description) > 20, name
        assert (m.input.sampling is not None) == (name == "sine"), name


# ---- plots, on small hand-made numbers (no training) ---------------------------------------
def contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """WCAG 2 contrast ratio of two sRGB colours."""

    def luminance(rgb: tuple[float, ...]) -> float:
        lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb[:3]]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_confusion_matrix_shows_row_percentages_readably_and_the_accuracy() -> None:
    matrix = [[111, 0, 1], [3, 123, 0], [0, 40, 60]]
    fig = plots.confusion_figure(matrix, ["a", "b", "c"], "m: held-out confusion")
    ax = fig.axes[0]
    image = ax.get_images()[0]
    cells = {}
    for t in ax.texts:
        col, row = (round(v) for v in t.get_position())
        cells[row, col] = t
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            text = cells[i, j].get_text()
            assert text.split("\n")[0] == str(count)
            if count:
                assert text.split("\n")[1] == f"{100 * count / sum(row):.1f}%"
            cell = image.cmap(image.norm(count / sum(row)))
            assert contrast(to_rgb(cells[i, j].get_color()), cell) >= 4.5, (i, j, text)
    accuracy = 100 * (111 + 123 + 60) / sum(map(sum, matrix))
    assert f"accuracy {accuracy:.1f}% (294 of 338)" in ax.get_title()


def loss_info(reasons: list[str]) -> plots.LossInfo:
    return plots.LossInfo(
        "cross-entropy (nats)", max_epochs=10, patience=2, why_validation_lower=reasons
    )


def test_loss_curves_mark_the_kept_epoch_with_integer_ticks_and_named_axes() -> None:
    history = {"train_loss": [1.0, 0.5, 0.4, 0.45, 0.5], "val_loss": [0.8, 0.45, 0.3, 0.35, 0.4]}
    fig = plots.loss_figure(history, "m: loss", loss_info(["dropout (p = 0.3) is active"]))
    ax = fig.axes[0]
    kept = [line for line in ax.get_lines() if list(line.get_xdata()) == [3, 3]]
    assert kept, "a vertical line at epoch 3, the lowest validation loss"
    assert any("kept: epoch 3" in t.get_text() for t in ax.texts)
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_xlabel() == "epoch" and "cross-entropy" in ax.get_ylabel()
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "after epoch 5 of 10" in caption and "epoch 3" in caption
    assert "below training loss in every epoch" in caption and "dropout" in caption


def test_loss_caption_explains_only_what_happened() -> None:
    above = {"train_loss": [0.5, 0.4, 0.3], "val_loss": [0.6, 0.5, 0.35]}
    caption = plots.loss_caption(above["train_loss"], above["val_loss"], loss_info(["dropout"]))
    assert "below" not in caption and "dropout" not in caption
    history = {"train_loss": [0.5] * 10, "val_loss": [0.6, 0.4] + [0.6] * 8}
    caption = plots.loss_caption(history["train_loss"], history["val_loss"], loss_info(["x"]))
    assert "Ran all 10 epochs" in caption and "in epochs 2:" in caption


def test_store_summary_shows_every_model_against_its_bar(tmp_path: Path) -> None:
    results = [
        plots.BarResult("a", 1, "accuracy", 0.97, 0.9, True, quick=True),
        plots.BarResult("b", 2, "accuracy", 0.80, 0.9, True, quick=False),
        plots.BarResult("c", 1, "mse", 5e-5, 1e-2, False, quick=True),
    ]
    fig = plots.summary_figure(results, {"d": "no manifest"}, "store")
    rows = [ax for ax in fig.axes if ax.get_lines()]
    assert len(rows) == 3
    for ax, r in zip(rows, results, strict=True):
        limit = [
            ln
            for ln in ax.get_lines()
            if len(set(ln.get_xdata())) == 1 and len(ln.get_xdata()) == 2
        ]
        assert limit and limit[0].get_xdata()[0] == pytest.approx(r.limit)
        left, right = ax.get_xlim()
        assert left < min(r.value, r.limit) and max(r.value, r.limit) <= right
        verdict = " ".join(t.get_text() for t in ax.texts)
        passes = r.value >= r.limit if r.higher_is_better else r.value <= r.limit
        assert ("passed" in verdict) == passes and ("MISSED" in verdict) == (not passes)
    assert "2 of 3 models pass" in fig._suptitle.get_text()
    assert any("d: unreadable" in t.get_text() for t in fig.texts)


# ---- progress ------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_progress_prints_one_line_per_epoch_with_k_of_n_and_the_time_left() -> None:
    specs = [zoo.get("elman"), zoo.get("sine")]
    out, clock = io.StringIO(), FakeClock()
    run = Progress(specs, quick=True, stream=out, live=False, line_every_s=1.0, clock=clock)
    for k, spec in enumerate(specs, 1):
        with run.model(spec, f"[{k}/2]") as on_epoch:
            for n in range(1, 4):
                clock.now += 2.0
                on_epoch(Epoch(n, 0.5, 0.4, improved=n == 1, seconds=2.0))
    text = out.getvalue()
    assert "\r" not in text
    epoch_lines = [line for line in text.splitlines() if " epoch " in line]
    assert [ln.split(" epoch ")[0] for ln in epoch_lines] == ["[1/2] elman"] * 3 + [
        "[2/2] sine"
    ] * 3
    assert all(re.search(r"~\d+ (s|min \d+ s) left", ln) for ln in epoch_lines)


def test_plain_progress_merges_epochs_quicker_than_a_second_but_keeps_the_last() -> None:
    out, clock = io.StringIO(), FakeClock()
    spec = zoo.get("char_hello")
    run = Progress([spec], quick=True, stream=out, live=False, line_every_s=1.0, clock=clock)
    with run.model(spec, "[1/1]") as on_epoch:
        for n in range(1, 151):
            clock.now += 0.1
            on_epoch(Epoch(n, 0.5, 0.4, improved=False, seconds=0.1))
    numbers = [int(m) for m in re.findall(r"epoch (\d+)/150", out.getvalue())]
    assert numbers[0] == 1 and numbers[-1] == 150 and numbers == sorted(numbers)
    assert 14 <= len(numbers) <= 17  # one a second over 15 s, plus the last


def test_run_estimate_rescales_the_rest_by_the_speed_measured_so_far() -> None:
    specs = [zoo.get("elman"), zoo.get("seq_lstm")]
    clock = FakeClock()
    est = RunEstimate(specs, quick=True, clock=clock)
    first, second = epoch_seconds(specs[0], True), epoch_seconds(specs[1], True)
    est.model_started()
    for _ in range(6):  # elman's 6 quick epochs, each three times slower than predicted
        clock.now += 3 * first
        est.epoch_done(3 * first)
    clock.now += 4.0  # export and metrics
    est.model_done()
    assert est.left() == pytest.approx(3 * second * 3 + 4.0)  # seq_lstm: 3 quick epochs
    est.model_started()
    clock.now += 3 * second
    est.epoch_done(3 * second)
    assert est.left() == pytest.approx(2 * second * 3 + 4.0)


def run_train_cli(tmp_path: Path, stdout) -> subprocess.CompletedProcess:
    args = ["train", "elman", "--quick", "--set", "epochs=3", "--set", "n_train=64"]
    return subprocess.run(
        [sys.executable, "-m", "training", *args, "--store", str(tmp_path / "store")],
        cwd=ROOT,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=300,
        check=False,
    )


def test_train_off_a_terminal_writes_plain_lines_and_the_store_summary(tmp_path: Path) -> None:
    done = run_train_cli(tmp_path, subprocess.PIPE)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert done.returncode in (0, 1), err  # 1: three tiny epochs may miss the bar
    assert "\r" not in out and "\r" not in err
    numbers = [int(n) for n in re.findall(r"^\[1/1\] elman epoch (\d)/3: ", out, re.M)]
    assert numbers[0] == 1 and numbers[-1] == 3 and numbers == sorted(set(numbers))
    assert re.search(r"^\[1/1\] elman: accuracy .* run done in \d+ s$", out, re.M)
    summary = tmp_path / "store" / "summary.png"
    assert f"summary of {tmp_path / 'store'}: {summary}" in out
    assert summary.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_on_a_terminal_draws_a_bar_instead(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "elman",
            "--quick",
            "--set",
            "epochs=3",
            "--set",
            "n_train=64",
            "--store",
            str(tmp_path / "store"),
        ],
        cwd=ROOT,
        stdout=follower,
        stderr=subprocess.DEVNULL,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=300) in (0, 1)
    os.close(leader)
    out = b"".join(chunks).decode()
    assert re.search(r"\r\[1/1\] elman: +\d+%", out)  # tqdm redraws its line in place
    assert not re.search(r"elman epoch \d/3:", out)  # no plain epoch lines on a terminal


def test_docs_show_the_sine_input_as_exported(quick_store: Path) -> None:
    text = (ROOT / "docs" / "manifest.md").read_text()
    section = text.split("## What the sine model was trained on", 1)[1]
    shown = json.loads(section.split("```json", 1)[1].split("```", 1)[0])["input"]
    exported = json.loads((resolve(quick_store, "sine") / "manifest.json").read_text())["input"]
    assert shown == exported
