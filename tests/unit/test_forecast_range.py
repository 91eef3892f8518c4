"""``client forecast``'s warning from the manifest alone: sine values of known frequency, made
here with NumPy, against manifests that say (or do not say) what sine was trained on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from serving.client_cli import input_range_warning, known_continuation, plot_forecast

DT = 0.15708
NEW = {  # what export writes since the manifest describes its input
    "name": "sine",
    "input": {
        "range": {"min": -1.0, "max": 1.0},
        "sampling": {
            "dt": DT,
            "angular_frequency": {"min": 0.5, "max": 2.0},
            "period_steps": {"min": 20.0, "max": 80.0},
        },
    },
}
OLD = {"name": "sine", "training": {"task_args": {"dt": DT, "w_min": 0.5, "w_max": 2.0}}}


def sine(w: float, n: int = 8, phase: float = 0.3) -> list[list[float]]:
    return np.sin(w * DT * np.arange(n) + phase).round(3).reshape(-1, 1).tolist()


@pytest.mark.parametrize("manifest", [NEW, OLD], ids=["input.sampling", "task_args"])
@pytest.mark.parametrize(("w", "warns"), [(0.6, False), (1.0, False), (1.9, False), (4.0, True)])
def test_the_frequency_the_values_imply_is_checked(manifest, w: float, warns: bool) -> None:
    warning = input_range_warning(manifest, sine(w))
    assert (warning is not None) == warns, warning
    if warns:
        assert "w ≈ 4.0" in warning and "[0.5, 2.0]" in warning


def test_values_outside_the_range_and_a_manifest_that_says_nothing() -> None:
    assert "values outside [-1.0, 1.0]" in (input_range_warning(NEW, [[0.0], [2.0]]) or "")
    assert input_range_warning(OLD, [[0.0], [2.0]]) is None  # no range declared: no guess
    assert input_range_warning({"name": "x"}, sine(4.0)) is None
    assert input_range_warning(NEW, [[0.0], [0.1]]) is None  # too few values to tell


# ---- forecast --plot: the true continuation of a known function --------------------------------


def test_the_continuation_of_a_sampled_sine_is_that_sine_ahead():
    dt, w, phase = 0.157, 1.3, 0.4
    values = [math.sin(w * k * dt + phase) for k in range(8)]
    ahead = known_continuation(values, dt, 20)
    expected = [math.sin(w * (8 + j) * dt + phase) for j in range(20)]
    assert (
        ahead is not None and max(abs(a - e) for a, e in zip(ahead, expected, strict=True)) < 1e-3
    )


def test_values_that_are_no_sine_have_no_known_continuation():
    assert known_continuation([0.0, 0.9, 0.1, 0.8, -0.5, 0.3], 0.157, 5) is None
    assert known_continuation([0.5, 0.6], 0.157, 5) is None  # too few to tell


def test_the_forecast_plot_draws_history_forecast_and_truth(tmp_path):
    dt = 0.157
    history = [[math.sin(k * dt)] for k in range(6)]
    forecast = [[math.sin((6 + j) * dt) + 0.01] for j in range(10)]
    truth = known_continuation([h[0] for h in history], dt, 10)
    path = tmp_path / "forecast.png"
    plot_forecast(history, forecast, str(path), "sine", truth)
    assert path.read_bytes()[:4] == b"\x89PNG"
