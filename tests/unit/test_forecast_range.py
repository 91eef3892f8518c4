"""``client forecast``'s warning from the manifest alone: sine values of known frequency, made
here with NumPy, against manifests that say (or do not say) what sine was trained on."""

from __future__ import annotations

import numpy as np
import pytest

from serving.client_cli import input_range_warning

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
