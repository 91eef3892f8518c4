"""Engine (models, Predict, the shared checks) against the quick zoo and the eager PyTorch
reference. Sessions and steps are the native core's: tests/integration covers them over gRPC."""

from __future__ import annotations

import asyncio
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from eager import TOL, Reference

from serving.backends import initial_states
from serving.engine import Engine, EngineConfig, sample_token
from serving.errors import ArtifactError, InvalidInput, ModelNotFound, VersionNotFound
from serving.manifest import load_manifest


@asynccontextmanager
async def running(store: Path, **kw):
    engine = Engine(EngineConfig(store=store, **kw))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(1.0)


@pytest.fixture(scope="module")
def ref(quick_store: Path) -> Reference:
    return Reference(quick_store)


def features(rng: np.random.Generator, steps: int, f: int = 1) -> np.ndarray:
    return rng.normal(size=(steps, f)).astype(np.float32)


def chunk_for_static(
    store: Path, model: str, rng: np.random.Generator, steps: int = 3
) -> np.ndarray:
    m = load_manifest(store / model / "1", verify=False)
    if m.input.kind == "tokens":
        return rng.integers(0, len(m.input.vocab), size=steps).astype(np.int64)
    return features(rng, steps, m.input.features)


# ---- backends ------------------------------------------------------------------------------------


def test_both_backends_step_and_predict_alike(quick_store):
    """The step graph the core calls once per batch, and the sequence graph of Predict."""
    rng = np.random.default_rng(3)
    x = {
        m: np.stack([chunk_for_static(quick_store, m, rng) for _ in range(4)])
        for m in ["seq_gru", "char"]
    }
    rows = [
        features(
            rng, 5, load_manifest(quick_store / "seq_bilstm" / "1", verify=False).input.features
        )
    ]

    def run(backend):
        e = Engine(EngineConfig(store=quick_store, backend=backend))
        out = {}
        for model, batch in x.items():
            lm = e.model(model)
            out[model] = lm.backend.step(batch, initial_states(lm.manifest, len(batch)))[0]

        async def predict():
            async with running(quick_store, backend=backend) as running_engine:
                return await running_engine.predict("seq_bilstm", None, rows)

        out["predict"] = asyncio.run(predict())
        return out

    onnx, ts = run("onnx"), run("torchscript")
    for key in onnx:
        np.testing.assert_allclose(onnx[key], ts[key], atol=TOL, err_msg=key)


# ---- Predict -------------------------------------------------------------------------------------


def test_predict_variable_lengths_every_model_kind_incl_bidirectional(quick_store, ref):
    rng = np.random.default_rng(5)
    models = ("seq_bilstm", "seq_lstm", "sum_sign_lstm", "char")
    rows = {m: [chunk_for_static(quick_store, m, rng, n) for n in (1, 7, 3, 12)] for m in models}

    async def main():
        async with running(quick_store) as e:
            return {m: await e.predict(m, None, rows[m]) for m in models}

    for model, y in asyncio.run(main()).items():
        np.testing.assert_allclose(y, ref.sequence(model, rows[model]), atol=TOL, err_msg=model)


def test_concurrent_predicts_share_backend_calls_and_equal_each_alone(quick_store, ref):
    rng = np.random.default_rng(11)
    requests = [
        [chunk_for_static(quick_store, "seq_lstm", rng, int(n))] for n in rng.integers(1, 30, 48)
    ]

    async def main():
        async with running(quick_store) as e:
            answers = await asyncio.gather(*(e.predict("seq_lstm", None, r) for r in requests))
            return answers, e._predictors[e.model("seq_lstm").key].batches

    answers, batches = asyncio.run(main())
    assert batches < len(requests)  # calls that arrived together ran together
    for rows, y in zip(requests, answers, strict=True):
        np.testing.assert_allclose(y, ref.sequence("seq_lstm", rows), atol=TOL)


def test_bad_inputs_are_refused_before_they_reach_a_batch(quick_store):
    async def main():
        async with running(quick_store, max_steps_per_request=8) as e:
            cases = [
                ("sum_sign_lstm", np.zeros((2, 3), np.float32), "expects 1 feature per step"),
                ("sum_sign_lstm", np.array([[np.nan]], np.float32), "NaN or Inf"),
                ("sum_sign_lstm", np.zeros((0, 1), np.float32), "empty input"),
                ("sum_sign_lstm", np.zeros((9, 1), np.float32), "at most 8"),
                ("sum_sign_lstm", np.zeros(3, np.int64), "float features"),
                ("char", np.array([10_000], np.int64), "outside the vocabulary"),
                ("char", np.zeros((1, 1), np.float32), "token ids"),
            ]
            for model, x, message in cases:
                with pytest.raises(InvalidInput, match=message):
                    await e.predict(model, None, [x])
            with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
                await e.predict("nope", None, [np.zeros((1, 1), np.float32)])
            with pytest.raises(VersionNotFound, match="no version 99"):
                e.model("sine", 99)

    asyncio.run(main())


# ---- loading, config, sampling ---------------------------------------------------------------


def test_a_corrupt_artifact_is_refused(quick_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(quick_store / "sine", store / "sine")
    graph = next((store / "sine" / "1").glob("*.onnx"))
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        Engine(EngineConfig(store=store))


def test_sample_token_extreme_temperatures_stay_well_defined():
    p = np.array([0.05, 0.6, 0.3, 0.05], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample_token(p, 1e-310, 0, rng) == 1  # all but the best logit underflow to -inf
    assert sample_token(p, 0.0, 0, rng) == 1
    draws = [sample_token(p, 1e30, 2, rng) for _ in range(200)]  # near-uniform over the top 2
    assert set(draws) == {1, 2}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_sessions", 0),
        ("max_steps_per_request", 0),
        ("executor_threads", -1),
        ("session_ttl_s", 0.0),
        ("max_queue_delay_ms", -1.0),
        ("session_ttl_s", float("nan")),
    ],
)
def test_a_bad_config_value_is_refused_by_name_before_loading(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(store=tmp_path, **{field: value})
