"""PredictBatcher: concurrent whole-sequence requests share one sequence-graph call, exactly."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.backends import load_model
from serving.predict_batcher import PredictBatcher
from training.reference import load_eager


def _rows(rng: np.random.Generator, n: int, features: int) -> list[np.ndarray]:
    return [
        rng.normal(size=(int(rng.integers(1, 40)), features)).astype(np.float32) for _ in range(n)
    ]


async def _run_concurrently(batcher: PredictBatcher, requests: list[list[np.ndarray]]):
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.stop()


@pytest.mark.parametrize("name", ["seq_lstm", "seq_bilstm"])
def test_concurrent_requests_batch_and_equal_each_row_alone(quick_store: Path, name: str) -> None:
    model = load_model(quick_store, name)
    eager = load_eager(model.path)
    rng = np.random.default_rng(7)
    requests = [
        _rows(rng, int(rng.integers(1, 4)), model.manifest.input.features) for _ in range(40)
    ]
    with ThreadPoolExecutor(1) as pool:
        batcher = PredictBatcher(name, model.backend, pool, max_rows=32)
        answers = asyncio.run(_run_concurrently(batcher, requests))
    assert batcher.requests == 40
    assert batcher.batches < 40  # requests really shared calls
    for rows, y in zip(requests, answers, strict=True):
        assert y.shape == (len(rows), model.manifest.output.size)
        for row, got in zip(rows, y, strict=True):
            with torch.no_grad():
                want = eager.sequence(torch.from_numpy(row[None]), torch.tensor([len(row)]))
            np.testing.assert_allclose(got, want.numpy()[0], atol=1e-5)


def test_max_rows_bounds_a_batch_but_never_splits_a_request(quick_store: Path) -> None:
    model = load_model(quick_store, "seq_lstm")
    sizes: list[int] = []
    rng = np.random.default_rng(1)
    requests = [_rows(rng, 5, 10) for _ in range(6)]
    with ThreadPoolExecutor(1) as pool:
        batcher = PredictBatcher("seq_lstm", model.backend, pool, max_rows=8, on_batch=sizes.append)
        asyncio.run(_run_concurrently(batcher, requests))
    assert sizes == [5] * 6  # two requests of 5 rows would exceed 8


def test_submit_after_stop_is_unavailable(quick_store: Path) -> None:
    from serving.errors import Unavailable

    model = load_model(quick_store, "seq_lstm")

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher = PredictBatcher("seq_lstm", model.backend, pool)
            batcher.start()
            await batcher.stop()
            with pytest.raises(Unavailable):
                batcher.submit([np.zeros((1, 10), np.float32)])

    asyncio.run(scenario())


def test_bad_max_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="max_rows"):
        PredictBatcher("m", None, None, max_rows=0)  # type: ignore[arg-type]


def test_plan_calls_keeps_every_call_within_its_padding_and_row_caps() -> None:
    from serving.predict_batcher import PADDING_SLACK, plan_calls

    lengths = [1024] + [1] * 63 + [500, 510, 20]
    calls = plan_calls(lengths, max_rows=256, max_padded=16_384)
    assert sorted(i for call in calls for i in call) == list(range(len(lengths)))  # each once
    for call in calls:
        longest = max(lengths[i] for i in call)
        assert len(call) * longest <= 16_384
        assert len(call) * longest <= 2 * sum(lengths[i] for i in call) + PADDING_SLACK
    (with_long,) = [call for call in calls if 0 in call]
    assert not set(with_long) & set(range(1, 64))  # the 63 one-step rows are not padded to 1,024
    assert [len(c) for c in plan_calls([1024] * 40, 256, 16_384)] == [16, 16, 8]
    assert [len(c) for c in plan_calls([1] * 600, 256, 16_384)] == [256, 256, 88]
