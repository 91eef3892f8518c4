"""``codec.probabilities_row`` (plain Python, one step) equals ``codec.probabilities`` (NumPy)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from serving import codec
from serving.manifest import list_models, list_versions, load_manifest, resolve


def manifests(store: Path):
    for name in list_models(store):
        m = load_manifest(resolve(store, name, list_versions(store, name)[-1]))
        if m.output.kind != "regression":
            yield m


def test_every_activation_of_the_zoo_gives_the_numpy_probabilities(quick_store):
    rng = np.random.default_rng(0)
    seen = set()
    for m in manifests(quick_store):
        seen.add(m.output.activation)
        for scale in (0.1, 3.0, 40.0):  # near-uniform, peaked, saturated
            y = (rng.normal(size=m.output.size) * scale).astype(np.float32)  # (O,)
            if m.output.activation == "log_softmax":
                y = y - np.log(np.exp(y.astype(np.float64)).sum()).astype(np.float32)
            want = codec.probabilities(m, y)
            got = codec.probabilities_row(m, y.tolist())
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=m.name)
            assert int(np.argmax(want)) == max(range(len(got)), key=got.__getitem__)
    assert {"softmax", "sigmoid"} <= seen, seen


@pytest.mark.parametrize("logit", [-1e4, -750.0, 0.0, 750.0, 1e4])
def test_a_sigmoid_head_never_overflows(quick_store, logit):
    m = next(m for m in manifests(quick_store) if m.output.activation == "sigmoid")
    p = codec.probabilities_row(m, [logit])
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in p) and math.isclose(sum(p), 1.0)
