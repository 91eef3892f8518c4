"""Triton's own tools against rnnserve, unchanged: tritonclient reads the model configuration,
statistics and repository index, and the C++ perf_analyzer (tritonclient 2.41.0's wheel) drives
seq_lstm's sequences, unary and streaming.

Black-box: every check goes over gRPC (and the metrics endpoint) to a real server on loopback.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
from eager import TOL, Reference
from google.protobuf import descriptor
from grpc_support import manifest, server_config
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from bench import perf_analyzer
from serving import oip_api
from serving.server import ServerThread

SEQUENCE_LENGTH = 20  # perf_analyzer's mean requests per sequence (±20% by default)


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    with ServerThread(server_config(quick_store)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(server.address)
    yield c
    c.close()


def stats(client: triton.InferenceServerClient, model: str) -> Any:
    (s,) = client.get_inference_statistics(model).model_stats
    return s


def closed_sessions(server: ServerThread, model: str) -> float:
    """rnnserve_sessions_closed_total{model}: OIP sequences ended by sequence_end."""
    assert server.server is not None
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(rf'^rnnserve_sessions_closed_total{{model="{model}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def sequence_input(chunk: np.ndarray) -> triton.InferInput:
    x = triton.InferInput("x", [1, *chunk.shape], "FP32")
    x.set_data_from_numpy(chunk[None])
    return x


# ---- the protocol ------------------------------------------------------------------------------


def _fields(d: descriptor.Descriptor) -> dict[str, tuple[int, int, str]]:
    def type_name(f: descriptor.FieldDescriptor) -> str:
        kind = f.message_type or f.enum_type
        return kind.full_name if kind else ""

    return {f.name: (f.number, f.type, type_name(f)) for f in d.fields}


def _declared(d: descriptor.Descriptor) -> Iterator[descriptor.Descriptor]:
    yield d
    for nested in d.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _declared(nested)


def test_every_declared_field_has_tritons_name_number_and_type() -> None:
    """Wire compatibility: each message and field we declare is Triton's, as in tritonclient."""
    theirs = {**service_pb2.DESCRIPTOR.message_types_by_name}
    theirs.update(model_config_pb2.DESCRIPTOR.message_types_by_name)
    pool = oip_api.DESCRIPTOR_POOL
    checked = 0
    for name in ["ModelConfig", "ModelConfigResponse", "ModelStatisticsResponse", *theirs]:
        try:
            ours_top = pool.FindMessageTypeByName(f"inference.{name}")
        except KeyError:
            continue  # a Triton message we do not declare
        for ours in _declared(ours_top):
            reference = service_pb2.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
            expected = _fields(reference)
            for field, value in _fields(ours).items():
                assert expected.get(field) == value, f"{ours.full_name}.{field}"
                checked += 1
    assert checked > 100


def test_server_metadata_lists_the_extensions_served(client: triton.InferenceServerClient) -> None:
    extensions = set(client.get_server_metadata().extensions)
    assert {"sequence", "classification", "model_configuration", "statistics"} <= extensions


def test_model_config_of_a_streamable_model_declares_sequence_batching(
    client: triton.InferenceServerClient, quick_store: Path
) -> None:
    m = manifest(quick_store, "seq_lstm")
    config = client.get_model_config("seq_lstm").config
    assert config.name == "seq_lstm" and config.platform == "onnxruntime_onnx"
    assert config.WhichOneof("scheduling_choice") == "sequence_batching"
    assert config.max_batch_size > 0
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("x", model_config_pb2.TYPE_FP32, [-1, m.input.features])
    ]
    outputs = {o.name: (o.data_type, list(o.dims)) for o in config.output}
    assert outputs == {
        "y": (model_config_pb2.TYPE_FP32, [-1, m.output.size]),
        "probabilities": (model_config_pb2.TYPE_FP32, [-1, m.output.size]),
        "label": (model_config_pb2.TYPE_STRING, [-1]),
    }
    metadata = client.get_model_metadata("seq_lstm")  # the same tensors, batch dim first
    assert [list(t.shape[1:]) for t in metadata.outputs] == [list(o.dims) for o in config.output]


def test_model_config_of_a_bidirectional_model_has_no_sequences(
    client: triton.InferenceServerClient,
) -> None:
    config = client.get_model_config("seq_bilstm").config
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert {o.name: list(o.dims) for o in config.output}["label"] == [1]


def test_model_config_of_an_unknown_model_is_not_found(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("no_such_model")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_repository_index_lists_every_model_version_ready(
    client: triton.InferenceServerClient, quick_store: Path
) -> None:
    index = client.get_model_repository_index().models
    on_disk = sorted(
        (p.parent.name, p.name) for p in quick_store.glob("*/*") if (p / "manifest.json").is_file()
    )
    assert sorted((m.name, m.version) for m in index) == on_disk
    assert {m.state for m in index} == {"READY"}


def test_statistics_count_successes_failures_and_their_phases(
    client: triton.InferenceServerClient, quick_store: Path
) -> None:
    before = stats(client, "seq_gru")
    rng = np.random.default_rng(3)
    features = manifest(quick_store, "seq_gru").input.features
    for i in range(3):
        chunk = rng.standard_normal((2, features)).astype(np.float32)
        client.infer("seq_gru", [sequence_input(chunk)], sequence_id=91, sequence_start=i == 0)
    with pytest.raises(InferenceServerException):  # a wrong feature count fails
        client.infer("seq_gru", [sequence_input(np.zeros((2, features + 1), np.float32))])
    after = stats(client, "seq_gru")
    a, b = after.inference_stats, before.inference_stats
    assert a.success.count - b.success.count == 3
    assert a.fail.count - b.fail.count == 1
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(a, phase).count - getattr(b, phase).count == 3, phase
        assert getattr(a, phase).ns > getattr(b, phase).ns, phase
    assert a.success.ns - b.success.ns >= a.compute_infer.ns - b.compute_infer.ns
    assert after.inference_count - before.inference_count == 3
    assert 1 <= after.execution_count - before.execution_count <= 3
    assert after.last_inference >= before.last_inference and after.last_inference > 0


def test_statistics_of_an_unknown_model_are_not_found(
    client: triton.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("no_such_model")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_a_sequence_carries_its_state_between_requests(
    client: triton.InferenceServerClient, quick_store: Path
) -> None:
    """A sequence's second request continues the first (eager reference), unlike a fresh one."""
    rng = np.random.default_rng(5)
    first, second = rng.standard_normal((2, 4, 10)).astype(np.float32)
    client.infer("seq_lstm", [sequence_input(first)], sequence_id=77, sequence_start=True)
    continued = client.infer("seq_lstm", [sequence_input(second)], sequence_id=77).as_numpy("y")
    fresh = client.infer("seq_lstm", [sequence_input(second)]).as_numpy("y")
    expected = Reference(quick_store).run("seq_lstm", [first, second])[4:]
    np.testing.assert_allclose(continued[0], expected, atol=TOL, rtol=TOL)
    assert np.abs(fresh[0] - expected).max() > 1e-3


# ---- perf_analyzer -----------------------------------------------------------------------------


def perf_analyzer_or_skip() -> None:
    try:
        perf_analyzer.ensure()
    except perf_analyzer.PerfAnalyzerUnavailable as e:
        pytest.skip(f"perf_analyzer cannot run on this machine: {e}")


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_perf_analyzer_drives_seq_lstm_sequences_without_a_failure(
    server: ServerThread, client: triton.InferenceServerClient, streaming: bool
) -> None:
    perf_analyzer_or_skip()
    before, closed_before = stats(client, "seq_lstm"), closed_sessions(server, "seq_lstm")
    result = perf_analyzer.run(
        server.address,
        "seq_lstm",
        shape="x:1,10",
        concurrency=4,
        streaming=streaming,
        sequence_length=SEQUENCE_LENGTH,
        window_ms=1000,
    )
    assert result.ok, result.output
    after, closed = stats(client, "seq_lstm"), closed_sessions(server, "seq_lstm") - closed_before
    successes = after.inference_stats.success.count - before.inference_stats.success.count
    assert after.inference_stats.fail.count == before.inference_stats.fail.count  # none failed
    assert successes >= result.request_count >= 100
    assert result.server_success > 0 and result.sequence_count > 0
    # the requests ran as sequences: each ended one opened by its start, ~20 requests apiece
    assert closed >= result.sequence_count
    assert 0.6 * SEQUENCE_LENGTH <= successes / closed <= 1.4 * SEQUENCE_LENGTH
