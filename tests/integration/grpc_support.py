"""Helpers shared by the rnnserve.v1 integration tests: configs, inputs, the eager reference."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.engine import EngineConfig
from serving.manifest import Manifest, load_manifest
from serving.server import ServerConfig

STREAMABLE = [
    "sum_sign_rnn", "sum_sign_lstm", "seq_lstm", "seq_gru", "elman", "sine", "char_hello", "char",
]  # fmt: skip


def server_config(store: Path, **engine: object) -> ServerConfig:
    return ServerConfig(
        EngineConfig(store=store, **engine),  # type: ignore[arg-type]
        address="127.0.0.1:0",
        metrics_port=0,
        grace_s=3.0,
    )


def manifest(store: Path, name: str) -> Manifest:
    return load_manifest(store / name / "1", verify=False)


def random_chunk(m: Manifest, rng: np.random.Generator, steps: int) -> np.ndarray:
    if m.input.kind == "tokens":
        return rng.integers(0, len(m.input.vocab or []), size=steps).astype(np.int64)
    return rng.normal(size=(steps, m.input.features)).astype(np.float32)


def to_input(x: np.ndarray) -> pb.Input:
    if x.dtype == np.int64:
        return pb.Input(tokens=pb.Tokens(ids=x.tolist()))
    return pb.Input(features=pb.Features(values=x.reshape(-1).tolist(), steps=x.shape[0]))


def raw(reply: pb.StepResponse) -> np.ndarray:
    """(T, O) head outputs of a reply."""
    return np.array([list(o.raw) for o in reply.outputs], dtype=np.float32)


def batch_totals(metrics_port: int) -> tuple[float, float]:
    """(rows, backend calls) over every model, from the server's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    rows = calls = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "rnnserve_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    rows += sample.value
                elif sample.name.endswith("_count"):
                    calls += sample.value
    return rows, calls


def expect_error(call: Callable[[], object], code: grpc.StatusCode) -> str:
    """The details of the RpcError ``call`` raises, which must carry ``code``."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value.details()
