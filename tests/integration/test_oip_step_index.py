"""rnnserve's OIP request parameter ``sequence_step_index``: a numbered sequence step is
idempotent, as rnnserve.v1's ``step_index`` (docs/oip.md, "Retrying a sequence step").

Black-box over gRPC against real native servers (one in memory; two sharing a real redis-server),
driven by the unmodified ``tritonclient`` and by raw OIP stubs; outputs are held to the eager
PyTorch reference (tests/eager.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, server_config
from redis_interleaving import InterleavingProxy
from redis_support import RedisProcess
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.server import ServerThread

MODEL = "seq_lstm"
PARAMETER = "sequence_step_index"


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    config = replace(server_config(quick_store), metrics_port=None)
    with ServerThread(config) as running:
        yield running


@pytest.fixture(scope="module")
def chunks(quick_store: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(23)
    m = manifest(quick_store, MODEL)
    return [random_chunk(m, rng, int(t)) for t in rng.integers(1, 5, size=6)]


def request(
    seq: Any, chunk: np.ndarray, index: Any = None, *, start: bool = False, end: bool = False
) -> service_pb2.ModelInferRequest:
    """A sequence step as raw OIP; ``index`` an int (uint64_param), or a (kind, value) pair."""
    r = service_pb2.ModelInferRequest(model_name=MODEL, id=f"{seq}/{index}")
    r.inputs.add(name="x", datatype="FP32", shape=[1, *chunk.shape])
    r.raw_input_contents.append(chunk.astype("<f4").tobytes())
    if seq is not None:
        r.parameters["sequence_id"].int64_param = seq
    r.parameters["sequence_start"].bool_param = start
    r.parameters["sequence_end"].bool_param = end
    if isinstance(index, int):
        r.parameters[PARAMETER].uint64_param = index
    elif index is not None:
        kind, value = index
        setattr(r.parameters[PARAMETER], kind, value)
    return r


def y_of(reply: service_pb2.ModelInferResponse) -> np.ndarray:
    """(T, O) of a one-row reply's ``y``."""
    at = [o.name for o in reply.outputs].index("y")
    shape = list(reply.outputs[at].shape)
    return np.frombuffer(reply.raw_output_contents[at], "<f4").reshape(shape)[0]


def refused(stub: Any, r: service_pb2.ModelInferRequest, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(r, timeout=10)
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def reference(store: Path, chunks: list[np.ndarray]) -> np.ndarray:
    return Reference(store).run(MODEL, chunks)


def test_a_retried_step_gets_its_stored_reply_and_the_sequence_advances_once(
    server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ys = [y_of(stub.ModelInfer(request(301, chunks[0], 0, start=True)))]
        ys.append(y_of(stub.ModelInfer(request(301, chunks[1], 1))))
        again = y_of(stub.ModelInfer(request(301, chunks[1], 1)))  # its reply "was lost"
        assert np.array_equal(again, ys[1])
        ys.append(y_of(stub.ModelInfer(request(301, chunks[2], 2))))
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:3]), atol=TOL, rtol=0
    )


def test_a_retried_start_restarts_the_sequence_with_the_same_outputs(
    server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        first = y_of(stub.ModelInfer(request(307, chunks[0], 0, start=True)))
        again = y_of(stub.ModelInfer(request(307, chunks[0], 0, start=True)))
        ys = [again, y_of(stub.ModelInfer(request(307, chunks[1], 1)))]
    np.testing.assert_allclose(first, again, atol=TOL, rtol=0)
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:2]), atol=TOL, rtol=0
    )


RACED_STARTS = 150


@pytest.fixture
def redis_server(quick_store: Path, tmp_path: Path) -> Iterator[ServerThread]:
    redis = RedisProcess(tmp_path)
    redis.start()
    config = replace(server_config(quick_store), metrics_port=None, session_store=redis.url)
    try:
        with ServerThread(config) as running:
            yield running
    finally:
        redis.stop()


def lost_start(e: grpc.RpcError, seq: int) -> bool:
    return e.code() == grpc.StatusCode.UNAVAILABLE and e.details() == (
        f"sequence {seq} of model '{MODEL}' was started again or ended by another request while "
        "this start ran; retry the start"
    )


def test_a_start_racing_its_retry_leaves_the_sequence_open_on_one_of_them(
    redis_server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    """Two starts of one sequence at once (a client's retry while the first still runs): the
    second one's restart closes the first one's opening, and that failed start must close its
    own opening only, not the one that replaced it (by id, it closed the sequence for good). A
    start that lost says so in the sequence's words, whichever moment it lost at. (With the
    Redis store: its round trips open the window; in memory a start's step claims the session
    right after its open.)"""
    want = reference(quick_store, chunks[:2])
    problems: Counter[str] = Counter()
    with grpc.insecure_channel(redis_server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for seq in range(5000, 5000 + RACED_STARTS):
            starts = [stub.ModelInfer.future(request(seq, chunks[0], 0, start=True)) for _ in "ab"]
            answered = [y_of(f.result()) for f in starts if f.exception() is None]
            for lost in (f.exception() for f in starts if f.exception() is not None):
                problems.update([] if lost_start(lost, seq) else [f"a start: {lost.details()}"])
            if not answered:
                problems["both starts failed"] += 1
                continue
            try:
                ys = [answered[0], y_of(stub.ModelInfer(request(seq, chunks[1], 1), timeout=10))]
            except grpc.RpcError as e:
                problems[f"the next step: {e.code().name} {e.details()}"] += 1
                continue
            if not np.allclose(np.concatenate(ys), want, atol=TOL, rtol=0):
                problems["outputs differ from eager"] += 1
    assert not problems, problems


def test_tritonclient_sends_the_index_as_an_int64_parameter(
    server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    client = triton.InferenceServerClient(server.address)
    try:

        def infer(i: int, **flags: bool) -> np.ndarray:
            x = triton.InferInput("x", [1, *chunks[i].shape], "FP32")
            x.set_data_from_numpy(chunks[i][None])
            r = client.infer(MODEL, [x], sequence_id=302, parameters={PARAMETER: i}, **flags)
            return r.as_numpy("y")[0]

        ys = [infer(0, sequence_start=True), infer(1)]
        assert np.array_equal(infer(1), ys[1])
        with pytest.raises(InferenceServerException) as info:
            infer(5)
        assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
        ys.append(infer(2, sequence_end=True))
    finally:
        client.close()
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:3]), atol=TOL, rtol=0
    )


def test_an_index_out_of_order_names_the_expected_one_and_changes_nothing(
    server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        ys = [y_of(stub.ModelInfer(request(303, chunks[0], 0, start=True)))]
        ys.append(y_of(stub.ModelInfer(request(303, chunks[1], 1))))
        ahead = refused(stub, request(303, chunks[2], 7), grpc.StatusCode.FAILED_PRECONDITION)
        assert ahead == (
            "sequence_step_index 7 is out of order for sequence 303 of model 'seq_lstm': "
            "expected 2 (or 1 to retry the last step)"
        )
        behind = refused(stub, request(303, chunks[2], 0), grpc.StatusCode.FAILED_PRECONDITION)
        assert "expected 2" in behind
        refused(stub, request(303, chunks[2], 3, end=True), grpc.StatusCode.FAILED_PRECONDITION)
        ys.append(y_of(stub.ModelInfer(request(303, chunks[2], 2))))  # not ended, not advanced
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:3]), atol=TOL, rtol=0
    )


def test_a_bad_index_is_invalid_argument_naming_the_parameter(
    server: ServerThread, chunks: list[np.ndarray]
) -> None:
    x = chunks[0]
    cases = [
        (request(304, x, ("int64_param", -1), start=True), "got -1"),
        (request(304, x, ("string_param", "3"), start=True), "got string_param"),
        (request(304, x, ("double_param", 1.0), start=True), "got double_param"),
        (request(304, x, ("bool_param", True), start=True), "got bool_param"),
        (request(304, x, 4, start=True), "a sequence starts at step 0"),
        (request(None, x, 0), "send it with a sequence_id"),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for r, phrase in cases:
            details = refused(stub, r, grpc.StatusCode.INVALID_ARGUMENT)
            assert PARAMETER in details and phrase in details, details
        # nothing was opened by the refused starts
        refused(stub, request(304, x, 0), grpc.StatusCode.NOT_FOUND)
        assert y_of(stub.ModelInfer(request(304, x, ("int64_param", 0), start=True))).size


def test_a_stream_retry_gets_the_stored_reply_in_order(
    server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    sent = [
        request(305, chunks[0], 0, start=True),
        request(305, chunks[1], 1),
        request(305, chunks[1], 1),  # a retry on the same stream
        request(305, chunks[2], 9),  # out of order: an error reply, the stream goes on
        request(305, chunks[2], 2),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        replies = list(stub.ModelStreamInfer(iter(sent), timeout=30))
    assert [r.error_message for r in replies[:3]] == ["", "", ""]
    assert replies[3].error_message.startswith("[FAILED_PRECONDITION] sequence_step_index 9 ")
    assert replies[4].error_message == ""
    ys = [y_of(replies[n].infer_response) for n in (0, 1, 2, 4)]
    assert np.array_equal(ys[2], ys[1])
    got = np.concatenate([ys[0], ys[1], ys[3]])
    np.testing.assert_allclose(got, reference(quick_store, chunks[:3]), atol=TOL, rtol=0)


def test_a_retry_on_another_replica_gets_the_reply_stored_in_redis(
    quick_store: Path, tmp_path: Path, chunks: list[np.ndarray]
) -> None:
    redis = RedisProcess(tmp_path)
    redis.start()
    config = replace(server_config(quick_store), metrics_port=None, session_store=redis.url)
    try:
        with ServerThread(config) as a, ServerThread(config) as b:
            ys = replica_to_replica(a.address, b.address, chunks)
    finally:
        redis.stop()
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:5]), atol=TOL, rtol=0
    )


def replica_to_replica(a: str, b: str, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """Sequence 306 stepped on a, retried and continued on b, then on a again: its outputs."""
    with grpc.insecure_channel(a) as ca, grpc.insecure_channel(b) as cb:
        on_a = service_pb2_grpc.GRPCInferenceServiceStub(ca)
        on_b = service_pb2_grpc.GRPCInferenceServiceStub(cb)
        ys = [y_of(on_a.ModelInfer(request(306, chunks[0], 0, start=True)))]
        ys += [y_of(on_a.ModelInfer(request(306, chunks[i], i))) for i in (1, 2)]
        # a "died" after stepping 2: the retry on b is answered from Redis, once
        assert np.array_equal(y_of(on_b.ModelInfer(request(306, chunks[2], 2))), ys[2])
        ys.append(y_of(on_b.ModelInfer(request(306, chunks[3], 3))))
        # a's copy is behind; the index it does not expect makes it re-read the record
        assert np.array_equal(y_of(on_a.ModelInfer(request(306, chunks[3], 3))), ys[3])
        late = request(306, chunks[4], 2)
        details = refused(on_a, late, grpc.StatusCode.FAILED_PRECONDITION)
        assert "expected 4 (or 3 to retry the last step)" in details
        ys.append(y_of(on_a.ModelInfer(request(306, chunks[4], 4, end=True))))
    return ys


RESTART_ROUNDS = 300  # per worker: the interleaving is the committer threads', not the test's


def test_a_restart_racing_steps_of_the_old_sequence_starts_fresh_in_redis(
    redis_server: ServerThread, quick_store: Path, chunks: list[np.ndarray]
) -> None:
    """A late write of the old sequence never drops the restarted one (same session id).

    An old step's write that finds the record gone (the restart closed it) forgets that session
    object only, not the new one cached under the id since, whose steps would then be kept
    nowhere. The old sequence steps from index 4 on while the new one uses 0..3, so the
    compare-and-set on the index keeps every old write off the new record. Which writes overlap
    is up to the server's threads, so the race is repeated, not staged.
    """
    want = reference(quick_store, chunks[:4])
    errors: list[str] = []
    with grpc.insecure_channel(redis_server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        args = [(stub, 2000 + w * RESTART_ROUNDS, chunks, want, errors) for w in range(3)]
        workers = [threading.Thread(target=restart_rounds, args=a) for a in args]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    assert not errors, errors[:3]


def restart_rounds(
    stub: Any, first_seq: int, chunks: list[np.ndarray], want: np.ndarray, errors: list[str]
) -> None:
    for seq in range(first_seq, first_seq + RESTART_ROUNDS):
        try:
            restart_round(stub, seq, chunks, want)
        except (AssertionError, grpc.RpcError) as e:
            errors.append(f"sequence {seq}: {e!r}")


def restart_round(stub: Any, seq: int, chunks: list[np.ndarray], want: np.ndarray) -> None:
    for i in range(4):
        stub.ModelInfer(request(seq, chunks[i], i, start=i == 0), timeout=10)
    stop = threading.Event()

    def old_steps() -> None:  # until the restart refuses them (the new sequence is at 0..3)
        for i in range(4, 4 + 50):
            if stop.is_set():
                return
            try:
                stub.ModelInfer(request(seq, chunks[i % 4], i), timeout=10)
            except grpc.RpcError:
                return

    old = threading.Thread(target=old_steps)
    old.start()
    try:
        ys = [y_of(stub.ModelInfer(request(seq, chunks[0], 0, start=True), timeout=10))]
    finally:
        stop.set()
        old.join()
    ys += [
        y_of(stub.ModelInfer(request(seq, chunks[i], i, end=i == 3), timeout=10)) for i in (1, 2, 3)
    ]
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("old_steps", [4, 1], ids=["other-index", "same-index"])
def test_a_late_write_of_a_restarted_sequence_never_lands_on_the_new_one(
    quick_store: Path, tmp_path: Path, chunks: list[np.ndarray], old_steps: int
) -> None:
    """The old sequence's last step writes while the restart's first one does, in that order.

    A proxy in front of Redis runs the two commits' writes interleaved (new SET, late SET, new
    compare-and-set, late compare-and-set): both staged records exist at once, and the restart
    must keep its own. After one old step, the late write expects index 1, which is where the
    restart's first step leaves the sequence: only the sequence's incarnation tells them apart
    (compared on the index alone, the late write landed, and the restart's step 1 was answered
    with the old sequence's reply as if it were a retry).
    """
    redis = RedisProcess(tmp_path)
    redis.start()
    proxy = InterleavingProxy(redis.port, late_index=old_steps + 1, new_index=1)
    proxy.start()
    config = replace(server_config(quick_store), metrics_port=None, session_store=proxy.url)
    try:
        with ServerThread(config) as server, grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            for i in range(old_steps):
                stub.ModelInfer(request(401, chunks[i], i, start=i == 0), timeout=10)
            proxy.armed.set()
            late = stub.ModelInfer.future(request(401, chunks[4], old_steps), timeout=10)
            assert proxy.late_held.wait(10)
            ys = [y_of(stub.ModelInfer(request(401, chunks[0], 0, start=True), timeout=10))]
            with contextlib.suppress(grpc.RpcError):
                late.result()  # answered or refused: it ran on the sequence it found
            proxy.armed.clear()
            ys += [y_of(stub.ModelInfer(request(401, chunks[i], i), timeout=10)) for i in (1, 2, 3)]
    finally:
        proxy.stop()
        redis.stop()
    assert proxy.order == ["new SET", "late SET", "new CAS", "late CAS"]
    np.testing.assert_allclose(
        np.concatenate(ys), reference(quick_store, chunks[:4]), atol=TOL, rtol=0
    )
