"""A reply is acknowledged only when it answers the request it came back for.

nginx 1.22 (Debian 12), answering 502 for a stream while replicas restarted, was seen handing the
client a zero-length message before the 502, for a step no replica had received (docs/operations.md,
"Check that a reply answers the step you sent"). A client that took it as the step's reply sent the
next step_index and heard "out of order": one step lost. Here a real server sits behind a proxy
that answers chosen calls with an empty message, either without passing the call on (as nginx
did) or after the server ran it (the step ran, its reply is lost). Our client must resend each
with the same step_index and end with outputs equal to the offline run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, raw, server_config

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.client import Client, ReplyMismatch, Session
from serving.server import ServerThread

MODEL = "seq_lstm"
SERVICE = "/rnnserve.v1.RnnServe/"


class ManglingProxy:
    """Passes rnnserve.v1 calls to ``upstream`` as bytes, except that the next calls queued in
    ``faults`` (one per call) are answered with an empty message: "drop" without passing the
    request on, "after" once the server has answered it; "end" ends the stream with status OK and
    no reply ("pass": passed on untouched)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.faults: list[str] = []
        self.lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers([_Handler(self)])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def next_fault(self) -> str | None:
        with self.lock:
            return self.faults.pop(0) if self.faults else None

    def unary(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        fault = self.next_fault()
        if fault == "drop":
            return b""
        reply = self.channel.unary_unary(method)(request, timeout=10)
        return b"" if fault == "after" else reply

    def stream(self, method: str, requests: Iterator[bytes], context) -> Iterator[bytes]:
        fault = self.next_fault()
        if fault in ("drop", "end"):
            next(requests, None)  # read, never passed on
            if fault == "drop":
                yield b""
            return  # "end": the stream ends OK, nothing answered
        upstream = self.channel.stream_stream(method)(requests, timeout=10)
        for i, reply in enumerate(upstream):
            yield b"" if fault == "after" and i == 0 else reply

    def __enter__(self) -> ManglingProxy:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(0)
        self.channel.close()


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, proxy: ManglingProxy) -> None:
        self.proxy = proxy

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method == SERVICE + "Step":
            return grpc.unary_unary_rpc_method_handler(lambda r, c: self.proxy.unary(method, r, c))
        if method in (SERVICE + "Session", SERVICE + "StepMany"):
            return grpc.stream_stream_rpc_method_handler(
                lambda rs, c: self.proxy.stream(method, rs, c)
            )
        return grpc.unary_unary_rpc_method_handler(lambda r, c: self.proxy.unary(method, r, c))


@pytest.fixture(scope="module")
def server(quick_store: Path) -> Iterator[ServerThread]:
    with ServerThread(server_config(quick_store)) as s:
        yield s


@pytest.fixture
def proxy(server: ServerThread) -> Iterator[ManglingProxy]:
    with ManglingProxy(server.address) as p:
        yield p


@pytest.fixture(scope="module")
def chunks(quick_store: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [random_chunk(manifest(quick_store, MODEL), rng, 2) for _ in range(6)]


def next_index(server: ServerThread, session_id: str) -> int:
    """The server's own count of the session's steps (an export names its next step_index)."""
    with Client(server.address) as direct:
        return direct.export_session(session_id).next_step_index


def test_a_step_answered_by_an_empty_message_is_sent_again_and_runs_once(
    quick_store: Path, server: ServerThread, proxy: ManglingProxy, chunks: list[np.ndarray]
) -> None:
    with Client(proxy.address, retries=4) as client:
        session = client.session(MODEL)
        # steps 0 and 1 each mangled twice: never passed on, then run with the reply lost
        proxy.faults = ["drop", "after", "pass", "drop", "after"]
        ys = [raw(session.step(c)) for c in chunks]
        assert not proxy.faults  # every fault was met, and retried past
        assert next_index(server, session.id) == len(chunks)  # none ran twice
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def test_a_step_mangled_on_every_try_raises_reply_mismatch_naming_both(
    server: ServerThread, proxy: ManglingProxy, chunks: list[np.ndarray]
) -> None:
    with Client(proxy.address, retries=2) as client:
        session = client.session(MODEL)
        proxy.faults = ["drop"] * 3
        wanted = r"step 0 of session .* got a reply for session '' step 0 \(.*: 3 of 3 tries\)"
        with pytest.raises(ReplyMismatch, match=wanted):
            session.step(chunks[0])


def test_a_session_stream_reply_that_answers_nothing_ends_the_stream(
    server: ServerThread, proxy: ManglingProxy, chunks: list[np.ndarray]
) -> None:
    with Client(proxy.address) as client:
        session = client.session(MODEL)
        proxy.faults = ["after"]
        replies = session.stream(iter([session.request(chunks[0])]))
        with pytest.raises(ReplyMismatch, match="step 0 of session") as mismatch:
            next(replies)
        assert [r.step_index for r in mismatch.value.unanswered] == [0]
        resent = Session(client, pb.SessionInfo(session_id=session.id, next_step_index=0))
        (reply,) = list(resent.stream(iter([resent.request(chunks[0])])))  # a retry: answered once
        assert reply.step_index == 0 and next_index(server, session.id) == 1


def test_a_session_stream_that_ends_with_a_step_unanswered_raises_reply_mismatch(
    server: ServerThread, proxy: ManglingProxy, chunks: list[np.ndarray]
) -> None:
    with Client(proxy.address) as client:
        session = client.session(MODEL)
        proxy.faults = ["end"]
        with pytest.raises(ReplyMismatch, match="ended with 1 steps unanswered") as mismatch:
            list(session.stream(iter([session.request(chunks[0])])))
        assert [r.step_index for r in mismatch.value.unanswered] == [0]
        assert next_index(server, session.id) == 0


@pytest.mark.parametrize("fault", ["drop", "after"])
def test_a_packed_block_answered_by_an_empty_message_raises_and_its_resend_is_answered_once(
    quick_store: Path,
    server: ServerThread,
    proxy: ManglingProxy,
    chunks: list[np.ndarray],
    fault: str,
) -> None:
    with Client(proxy.address) as client:
        ids = [client.session(MODEL).id for _ in range(3)]
        x = np.stack([chunks[0]] * 3)
        proxy.faults = [fault]
        with pytest.raises(
            ReplyMismatch, match=r"3 sessions at step_indexes \[0, 0, 0\] got a reply of 0"
        ):
            client.step_block(MODEL, ids, x, step_indexes=[0, 0, 0])
        r = client.step_block(MODEL, ids, x, step_indexes=[0, 0, 0])
    assert not r.errors and r.step_indexes.tolist() == [0, 0, 0]
    want = Reference(quick_store).run(MODEL, chunks[:1])
    for row in r.y:
        np.testing.assert_allclose(row.reshape(want.shape), want, atol=TOL, rtol=0)
    assert [next_index(server, i) for i in ids] == [1, 1, 1]
