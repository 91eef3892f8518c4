"""The shared session store on a real redis-server (native data plane), black-box over gRPC.

Every server here is a real native core; several of them share one Redis on a free loopback port,
as replicas behind a load balancer would. Outputs are held to the eager PyTorch reference.
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from eager import TOL, Reference
from grpc_support import expect_error, manifest, random_chunk, raw, server_config, to_input
from ports import free_ports
from redis_interleaving import StallingProxy
from redis_support import RedisProcess
from tritonclient.utils import InferenceServerException

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerConfig, ServerThread

MODEL = "seq_lstm"


def native_config(store: Path, url: str, **engine: object) -> ServerConfig:
    return replace(server_config(store, **engine), session_store=url, metrics_port=None)


class Replica:
    """A native server on the shared store, with a stub of our API."""

    def __init__(self, config: ServerConfig) -> None:
        self.thread = ServerThread(config)

    def __enter__(self) -> Replica:
        self.thread.__enter__()
        self.channel = grpc.insecure_channel(self.thread.address)
        self.api = pb_grpc.RnnServeStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self.thread.__exit__(*exc)

    def open(self) -> str:
        return self.api.OpenSession(pb.OpenSessionRequest(model=MODEL)).session_id

    def step(self, sid: str, index: int, chunk: np.ndarray) -> np.ndarray:
        request = pb.StepRequest(session_id=sid, step_index=index, input=to_input(chunk))
        return raw(self.api.Step(request, timeout=10))


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def chunks(quick_store: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    m = manifest(quick_store, MODEL)
    return [random_chunk(m, rng, int(t)) for t in rng.integers(1, 5, size=8)]


def test_a_session_opened_on_one_replica_continues_on_another(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        sid = a.open()
        ys = [a.step(sid, i, chunks[i]) for i in range(3)]
        ys += [b.step(sid, i, chunks[i]) for i in range(3, 6)]  # b reads it through
        # a still holds the session as of index 3: the retry of b's last step gets b's reply,
        # and the next index runs on the state b left
        assert np.array_equal(a.step(sid, 5, chunks[5]), ys[5])
        ys += [a.step(sid, i, chunks[i]) for i in range(6, 8)]
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def test_a_reset_or_close_on_one_replica_holds_on_every_other(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        sid = a.open()
        for i in range(3):
            a.step(sid, i, chunks[i])
        assert b.api.ResetSession(pb.ResetSessionRequest(session_id=sid)).next_step_index == 0
        y = a.step(sid, 0, chunks[0])  # a still holds index 3: it re-reads the reset session
        b.api.CloseSession(pb.CloseSessionRequest(session_id=sid))
        details = expect_error(lambda: a.step(sid, 1, chunks[1]), grpc.StatusCode.NOT_FOUND)
        assert details == f"unknown session '{sid}' (never opened or closed)"
    np.testing.assert_allclose(y, Reference(quick_store).run(MODEL, chunks[:1]), atol=TOL, rtol=0)


def test_two_replicas_never_both_advance_a_session(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        sid = a.open()
        b.step(sid, 0, chunks[0])  # both replicas now hold it
        ys = [a.step(sid, 0, chunks[0])]
        for i in range(1, len(chunks)):  # the same step sent to both at once, as a racing retry
            answers: list[np.ndarray] = []
            threads = [
                threading.Thread(
                    target=lambda r=r, i=i, out=answers: out.append(r.step(sid, i, chunks[i]))
                )
                for r in (a, b)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(answers) == 2 and np.array_equal(answers[0], answers[1])
            ys.append(answers[0])
        details = expect_error(
            lambda: b.step(sid, 99, chunks[0]), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert f"expected {len(chunks)} " in details  # each index applied once
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def test_sessions_survive_a_restart_of_every_replica(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a:
        sid = a.open()
        ys = [a.step(sid, i, chunks[i]) for i in range(4)]
    with Replica(config) as again:
        assert np.array_equal(again.step(sid, 3, chunks[3]), ys[3])  # the retry is answered too
        ys += [again.step(sid, i, chunks[i]) for i in range(4, 8)]
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def test_oip_sequences_continue_on_another_replica(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        ys = []
        for i, chunk in enumerate(chunks):
            replica = a if i % 2 == 0 else b
            client = triton.InferenceServerClient(replica.thread.address)
            tensor = triton.InferInput("x", [1, *chunk.shape], "FP32")
            tensor.set_data_from_numpy(chunk[None])
            result = client.infer(
                MODEL, [tensor], sequence_id=77, sequence_start=i == 0,
                sequence_end=i == len(chunks) - 1,
            )  # fmt: skip
            ys.append(result.as_numpy("y")[0])
            client.close()
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("numbered", [True, False], ids=["sequence_step_index", "next-step"])
def test_a_copy_of_a_sequence_restarted_on_another_replica_is_dropped_and_retried(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray], numbered: bool
) -> None:
    """a holds a copy of the first run; b restarts the sequence. The copy is found stale before
    the step runs (numbered: even a retry of the last step, which the copy could answer with the
    first run's reply, is checked against the record first) or when its write is refused
    (unnumbered: it may be a late request of the first run): either way it answers UNAVAILABLE
    in the sequence's words, and the retry reads the new run."""
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        clients = [triton.InferenceServerClient(r.thread.address) for r in (a, b)]

        def infer(on: int, chunk: np.ndarray, i: int) -> np.ndarray:
            tensor = triton.InferInput("x", [1, *chunk.shape], "FP32")
            tensor.set_data_from_numpy(chunk[None])
            index = {"sequence_step_index": i} if numbered else None
            result = clients[on].infer(
                MODEL, [tensor], sequence_id=9, sequence_start=i == 0, parameters=index
            )
            return result.as_numpy("y")[0]

        for i in range(5):
            infer(0, chunks[7 - i], i)  # the first run, on a
        ys = [infer(1, chunks[i], i) for i in range(5)]  # the restart, on b
        first = (4, chunks[4]) if numbered else (5, chunks[5])  # a retry of step 4, or step 5
        with pytest.raises(InferenceServerException) as refused:
            infer(0, first[1], first[0])
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert refused.value.message() == (
            f"sequence 9 of model '{MODEL}' was started again (perhaps on another replica) "
            "while this request ran; retry"
        )
        if numbered:
            assert np.array_equal(infer(0, chunks[4], 4), ys[4])  # the new run's stored reply
        ys.append(infer(0, chunks[5], 5))
        for client in clients:
            client.close()
    want = Reference(quick_store).run(MODEL, chunks[:6])
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("index", [3, 2, 0, 7], ids=["next", "retry", "behind", "ahead"])
def test_a_copy_of_a_session_closed_elsewhere_answers_not_found_at_any_index(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray], index: int
) -> None:
    """a's copy is at 3: 3 runs on it and its write finds no record; 2 would be answered from
    it and 0 and 7 do not match it, so those ask the store first."""
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        sid = a.open()
        for i in range(3):
            a.step(sid, i, chunks[i])
        b.api.CloseSession(pb.CloseSessionRequest(session_id=sid))
        details = expect_error(lambda: a.step(sid, index, chunks[0]), grpc.StatusCode.NOT_FOUND)
    assert details == f"unknown session '{sid}' (never opened or closed)"


def test_idle_expiry_and_capacity_hold_across_replicas(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url, session_ttl_s=1.0, max_sessions=3)
    with Replica(config) as a, Replica(config) as b:
        idle = a.open()
        a.step(idle, 0, chunks[0])
        b.open()
        a.open()
        details = expect_error(b.open, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "session capacity full (3 open sessions)" in details
        time.sleep(1.3)
        details = expect_error(lambda: b.step(idle, 1, chunks[1]), grpc.StatusCode.NOT_FOUND)
        assert details == f"session '{idle}' expired after 1 s idle; open a new one"
        b.open()  # the expired ones no longer count


def test_a_session_stepped_past_its_first_ttl_still_counts_toward_capacity(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url, session_ttl_s=1.0, max_sessions=2)
    with Replica(config) as a, Replica(config) as b:
        busy = a.open()
        ys = []
        for i, chunk in enumerate(chunks):  # 2 s of steps: past the deadline it was opened with
            ys.append(a.step(busy, i, chunk))
            time.sleep(0.25)
        b.open()
        details = expect_error(b.open, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "session capacity full (2 open sessions)" in details
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def test_capacity_frees_an_expired_session_behind_more_than_a_batch_of_live_ones(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    # 1,200 live sessions come due before an expired one: more than one sweep batch (1,000)
    config = native_config(quick_store, redis.url, max_sessions=1201)
    with Replica(config) as a:
        opening = pb.OpenSessionRequest(model=MODEL)
        futures = [a.api.OpenSession.future(opening) for _ in range(1200)]
        live = [f.result(timeout=60).session_id for f in futures]
        gone = a.open()
        # as Redis would see them a TTL on: the live ones' deadlines passed (each step pushes its
        # record's expiry, not its deadline), the other's record expired
        due = [x for sid in live for x in (b"1", sid.encode())]
        redis.raw(b"ZADD", b"rnnserve:live", *due, b"2", gone.encode())
        redis.raw(b"DEL", f"rnnserve:s:{gone}".encode())
        fresh = a.open()  # the expired one's place
        details = expect_error(a.open, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "session capacity full (1201 open sessions)" in details
        ys = [a.step(live[-1], 0, chunks[0]), a.step(fresh, 0, chunks[0])]
    want = Reference(quick_store).run(MODEL, chunks[:1])
    for y in ys:
        np.testing.assert_allclose(y, want, atol=TOL, rtol=0)


def test_a_write_whose_confirmation_was_lost_is_known_as_its_own_when_resent(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    """Redis runs a step's write, but its replies come after the server's 2 s timeout. The server
    sends the write again on a fresh connection and finds the record its first try wrote. It must
    take that record for its own: taken for another replica's, a step sent without a step_index
    ran again on the state just read, and one request stepped the session twice."""
    proxy = StallingProxy(redis.port)
    proxy.start()
    try:
        with Replica(native_config(quick_store, proxy.url)) as a:
            sid = a.open()
            ys = [a.step(sid, 0, chunks[0])]
            proxy.armed.set()
            unnumbered = pb.StepRequest(session_id=sid, input=to_input(chunks[1]))
            reply = a.api.Step(unnumbered, timeout=10)
            assert proxy.commits_after_stall == 1  # the server gave up on the first and resent it
            assert reply.step_index == 1
            ys += [raw(reply), a.step(sid, 2, chunks[2])]  # index 2 is next: step 1 ran once
    finally:
        proxy.stop()
    want = Reference(quick_store).run(MODEL, chunks[:3])
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def writes_seen(redis: RedisProcess) -> dict[str, int]:
    """Calls so far of every command that creates, changes or removes a key."""
    stats = redis.raw(b"INFO", b"commandstats").decode()
    calls = {}
    for name, count in re.findall(r"cmdstat_(\w+):calls=(\d+)", stats):
        if name in ("set", "evalsha", "rename", "del", "zadd", "zrem"):
            calls[name] = int(count)
    return calls


def store_contents(redis: RedisProcess) -> dict[bytes, bytes]:
    """Every key and its serialized value (DUMP), read with redis-cli."""

    def cli(*words: str) -> bytes:
        args = ["redis-cli", "-p", str(redis.port), "--raw", *words]
        return subprocess.run(args, capture_output=True, check=True, timeout=10).stdout

    keys = cli("KEYS", "*").split()
    return {key: cli("DUMP", key.decode()) for key in keys}


def test_a_stateless_oip_request_never_touches_the_store(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url, max_sessions=1)
    with Replica(config) as a:
        a.open()  # capacity full: a stateless request holds no session
        before = writes_seen(redis)
        client = triton.InferenceServerClient(a.thread.address)
        tensor = triton.InferInput("x", [1, *chunks[0].shape], "FP32")
        tensor.set_data_from_numpy(chunks[0][None])
        contents = store_contents(redis)
        assert len(contents) >= 2  # the open session's record and the live set, to compare
        y = client.infer(MODEL, [tensor]).as_numpy("y")[0]
        client.close()
        assert writes_seen(redis) == before
        assert store_contents(redis) == contents  # the EVAL-run writes (save, close) too
    want = Reference(quick_store).run(MODEL, chunks[:1])
    np.testing.assert_allclose(y, want, atol=TOL, rtol=0)


def test_a_corrupt_or_foreign_record_is_a_clear_error_and_the_server_stays_up(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a, Replica(config) as b:
        sid, neighbour = a.open(), a.open()
        a.step(sid, 0, chunks[0])
        redis.raw(b"SETRANGE", f"rnnserve:s:{sid}".encode(), b"60", b"\x7f\x7f")
        details = expect_error(lambda: b.step(sid, 1, chunks[1]), grpc.StatusCode.INTERNAL)
        assert "fails its checksum (corrupt)" in details and sid in details
        redis.raw(b"SET", b"rnnserve:s:foreign", b"{'not': 'ours'}")
        details = expect_error(lambda: b.step("foreign", 0, chunks[0]), grpc.StatusCode.INTERNAL)
        assert "is not an rnnserve session record" in details
        y = b.step(neighbour, 0, chunks[0])
    np.testing.assert_allclose(y, Reference(quick_store).run(MODEL, chunks[:1]), atol=TOL, rtol=0)


def record_in(redis: RedisProcess, sid: str) -> bytes:
    reply = redis.raw(b"GET", f"rnnserve:s:{sid}".encode())  # $<n>\r\n<record>\r\n
    head, _, rest = reply.partition(b"\r\n")
    return rest[: int(head[1:])]


def as_format_1(record: bytes) -> bytes:
    """The record as rnnserve wrote it before records carried an incarnation (bytes 24..40)."""
    body = record[:4] + b"\x01" + record[5:24] + record[40:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_record_of_the_previous_format_steps_on_and_is_rewritten_in_the_current_one(
    quick_store: Path, redis: RedisProcess, chunks: list[np.ndarray]
) -> None:
    config = native_config(quick_store, redis.url)
    with Replica(config) as a:
        sid = a.open()
        ys = [a.step(sid, 0, chunks[0])]
    assert record_in(redis, sid)[:5] == b"RNSS\x02"
    redis.raw(b"SET", f"rnnserve:s:{sid}".encode(), as_format_1(record_in(redis, sid)))
    with Replica(config) as b:  # a replica that reads it through
        ys += [b.step(sid, i, chunks[i]) for i in (1, 2)]
        assert np.array_equal(b.step(sid, 2, chunks[2]), ys[2])  # a retry, from the record
        rewritten = record_in(redis, sid)
        redis.raw(b"SET", b"rnnserve:s:newer", rewritten[:4] + b"\x03" + rewritten[5:])
        details = expect_error(lambda: b.step("newer", 0, chunks[0]), grpc.StatusCode.INTERNAL)
    assert rewritten[:5] == b"RNSS\x02" and int(rewritten[8:24], 16) == 3
    assert "has format version 3, this server reads versions 1 and 2" in details
    want = Reference(quick_store).run(MODEL, chunks[:3])
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)


def serve(store: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    port = free_ports(1)[0]
    args = [sys.executable, "-m", "serving.cli", "serve", "--store", str(store),
            "--address", f"127.0.0.1:{port}", "--metrics-port", "-1", *flags]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_redis_down_at_start_is_a_clear_error(quick_store: Path) -> None:
    nobody = free_ports(1)[0]
    run = serve(quick_store, "--session-store", f"redis://127.0.0.1:{nobody}")
    assert run.returncode == 4, run.stderr
    assert f"the session store redis://127.0.0.1:{nobody} cannot be reached" in run.stderr
    run = serve(quick_store, "--session-store", "postgres://127.0.0.1:5432")
    assert run.returncode == 2
    assert "session store must be 'memory' or redis://HOST:PORT[/DB]" in run.stderr


def test_redis_lost_mid_load_fails_steps_unavailable_and_recovers(
    quick_store: Path, tmp_path: Path, chunks: list[np.ndarray]
) -> None:
    durable = RedisProcess(tmp_path, appendonly=True)
    durable.start()
    try:
        with Replica(native_config(quick_store, durable.url)) as a:
            sid = a.open()
            ys = [a.step(sid, i, chunks[i]) for i in range(3)]
            durable.stop()
            details = expect_error(lambda: a.step(sid, 3, chunks[3]), grpc.StatusCode.UNAVAILABLE)
            assert details.startswith(f"session store unavailable ({durable.url}: ")
            # the write went out on a pooled connection before the failure showed: it cannot be
            # known not to have run (a Redis that dies after running it looks the same)
            assert details.endswith(
                "this step's write may have reached Redis but was not confirmed, so it may have "
                "been recorded; send it again with the same step_index, which is answered once"
            )
            expect_error(a.open, grpc.StatusCode.UNAVAILABLE)
            durable.start()
            ys += [a.step(sid, i, chunks[i]) for i in range(3, 8)]  # the same index, once
    finally:
        durable.stop()
    want = Reference(quick_store).run(MODEL, chunks)
    np.testing.assert_allclose(np.concatenate(ys), want, atol=TOL, rtol=0)
