"""One answer on every transport: the same input gives the same classification (labels with
probabilities, same order, same float32 numbers) and the same wrong input the same message, over
our gRPC API (a real server on loopback) and through the TorchServe handler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_support import server_config
from ts.context import Context, RequestProcessor

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.client import Client
from serving.manifest import resolve
from serving.server import ServerThread
from serving.torchserve.handler import RnnHandler


@pytest.fixture(scope="module")
def grpc_client(quick_store: Path) -> Iterator[Client]:
    with ServerThread(server_config(quick_store)) as server, Client(server.address) as client:
        yield client


def http_reply(store: Path, name: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The TorchServe handler's status and JSON body for one request, as TorchServe calls it."""
    version_dir = resolve(store, name)
    ctx = Context(name, str(version_dir), {"model": {"modelName": name}}, 1, None, "0.12.0")
    handler = RnnHandler()
    handler.initialize(ctx)
    ctx.request_processor = [RequestProcessor({})]
    (reply,) = handler.handle([{"body": json.dumps(body).encode()}], ctx)
    return ctx.get_response_status(0)[0], json.loads(reply)


def test_a_sure_classification_reads_the_same_over_grpc_and_http(grpc_client, quick_store):
    """gRPC said [4.69e-08, 0.99999994] and HTTP {"negative": 0.0, "positive": 1.0}."""
    steps = [[3.0]] * 10  # a large positive sum: "positive" with a probability of nearly 1
    (out,) = grpc_client.predict("sum_sign_lstm", [steps]).outputs
    labels = list(grpc_client.model("sum_sign_lstm").output.labels)
    status, http = http_reply(quick_store, "sum_sign_lstm", {"inputs": steps})
    assert status == 200, http
    assert http["labels"] == labels == ["negative", "positive"]
    assert (http["label"], http["index"]) == (out.label, out.index) == ("positive", 1)
    assert 0.0 < http["probabilities"][0] < 1e-3  # not rounded away to 0.0
    # the same float32 numbers, and the shortest decimals that read back as them
    assert np.float32(http["probabilities"]).tolist() == list(out.probabilities)
    assert [str(np.float32(p)) for p in out.probabilities] == [
        json.dumps(p) for p in http["probabilities"]
    ]


def test_a_wrong_feature_count_gets_one_message_on_both(grpc_client, quick_store):
    bad_grpc = pb.Input(features=pb.Features(values=[0.5] * 3, steps=1))
    with grpc_client.session("seq_lstm") as s, pytest.raises(grpc.RpcError) as refused:
        grpc_client.stub.Step(pb.StepRequest(session_id=s.id, step_index=0, input=bad_grpc))
    status, http = http_reply(quick_store, "seq_lstm", {"inputs": [[0.5] * 3]})
    expected = "seq_lstm expects 10 features per step: 3 values do not make 1 step of 10 features"
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details(), status, http["error"]) == (expected, 400, expected)
