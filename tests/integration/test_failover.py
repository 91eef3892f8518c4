"""Failover with real processes: three native replicas on one Redis behind nginx (grpc_pass over
HTTP/2), clients stepping 1,000 sessions over every transport at once (rnnserve.v1 Step through
our client, Session streams, StepMany entries and packed blocks; OIP ModelInfer and
ModelStreamInfer with ``sequence_step_index``), one replica killed with SIGKILL mid-load, then
every replica restarted together. Every session's outputs must equal the uninterrupted offline
run (tests/eager.py): no acknowledged step lost, none applied twice."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, raw, to_input
from lb_support import Nginx, Replica
from redis_support import RedisProcess
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import (
    Client,
    PackedReply,
    ReplyMismatch,
    Session,
    answers,
    pack_steps,
    retryable,
)

MODEL = "seq_lstm"
SESSIONS = 1000
STEPS = 5  # rounds before the full restart; one more after it
# transport -> worker threads; session i uses TRANSPORTS[i % 6]
WORKERS = {"step": 4, "session": 2, "entries": 1, "packed": 1, "oip": 3, "oip_stream": 2}
TRANSPORTS = tuple(WORKERS)
PER_MESSAGE = 12  # StepMany / packed / OIP stream: sessions per message (the rest waits its turn)
RETRIES = 40  # ~38 s of backoff: long enough for every replica to restart at once on a busy CI
LONG_TOL = 10 * TOL
ROLLING_SESSIONS = 60
ROLLING_ROUNDS = 2000  # an upper bound: the clients stop when the last replica serves again


class Cluster:
    def __init__(self, store: Path, folder: Path) -> None:
        self.redis = RedisProcess(folder)
        self.replicas = [Replica(store, "", folder / f"replica{i}.log") for i in range(3)]
        self.nginx: Nginx | None = None
        self.folder = folder

    def start(self) -> None:
        self.redis.start()
        for r in self.replicas:
            r.args[r.args.index("--session-store") + 1] = self.redis.url
            r.start()
        for r in self.replicas:
            r.wait_serving()
        self.nginx = Nginx(self.folder, [r.address for r in self.replicas])
        self.nginx.start()

    def restart_replicas(self) -> None:
        for r in self.replicas:
            r.signal(signal.SIGTERM)
        for r in self.replicas:
            r.wait()
        for r in self.replicas:
            r.start()
        for r in self.replicas:
            r.wait_serving()

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for r in self.replicas:
            r.stop()
        self.redis.stop()


@pytest.fixture
def cluster(quick_store: Path, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(quick_store, tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def backoff(attempt: int) -> None:
    time.sleep(min(0.05 * 2**attempt, 1.0))


def oip_request(seq: int, index: int, chunk: np.ndarray) -> oip.ModelInferRequest:
    """Step ``index`` of OIP sequence ``seq``, numbered so that a retry is answered once."""
    r = oip.ModelInferRequest(model_name=MODEL, id=f"{seq}:{index}")
    r.inputs.add(name="x", datatype="FP32", shape=[1, *chunk.shape])
    r.raw_input_contents.append(chunk.astype("<f4").tobytes())
    r.outputs.add(name="y")
    r.parameters["sequence_id"].int64_param = seq
    r.parameters["sequence_start"].bool_param = index == 0
    r.parameters["sequence_step_index"].uint64_param = index
    return r


def oip_y(reply: oip.ModelInferResponse) -> np.ndarray:
    shape = list(reply.outputs[0].shape)
    return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(shape)[0]


class Duplex:
    """A bidi call fed from a queue: requests go in when the caller has them; replies in order."""

    def __init__(self, method: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.replies = method(iter(self.requests.get, None), metadata=metadata, timeout=120)

    def send(self, request: Any) -> None:
        self.requests.put(request)

    def receive(self) -> Any:
        return next(self.replies)

    def close(self) -> None:
        self.requests.put(None)  # half-close: the server ends the stream once it has answered
        self.replies.cancel()


class CountingClient(Client):
    """Our client; a step it retried sets ``retried`` (it fails over before each retry)."""

    retried = False

    def fail_over(self) -> None:
        self.retried = True
        super().fail_over()


class Load:
    """The clients: every session's transport and chunks, the outputs acknowledged, and how long
    the steps cut by the kill took to be answered after it."""

    def __init__(self, store: Path, address: str, sessions: int, rounds: int) -> None:
        rng = np.random.default_rng(11)
        m = manifest(store, MODEL)
        self.address = address
        self.sessions = sessions
        self.transport = [TRANSPORTS[i % len(TRANSPORTS)] for i in range(sessions)]
        packed_steps = rng.integers(1, 4, size=rounds)  # a packed block shares one T
        self.chunks = [
            [
                random_chunk(m, rng, int(packed_steps[k] if t == "packed" else rng.integers(1, 4)))
                for k in range(rounds)
            ]
            for t in self.transport
        ]
        self.outputs: list[list[np.ndarray]] = [[] for _ in range(sessions)]
        self.ids: list[str] = [""] * sessions  # rnnserve.v1 sessions (OIP: sequence i + 1)
        self.stop = threading.Event()  # set: every worker ends after its current round
        self.pause = 0.0  # seconds between a worker's rounds
        self.done_steps = 0
        self.lock = threading.Lock()
        self.killed_at: float | None = None
        # per transport: steps sent before the kill and retried, seconds from the kill to their
        # answer; and how many steps sent after it were retried (a stream found cut, say)
        self.recovered: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        self.retried_later = dict.fromkeys(TRANSPORTS, 0)
        self.retried = dict.fromkeys(TRANSPORTS, 0)  # steps answered by a retry, kill or not
        # replies that did not answer their request (a proxy's fault: nginx 1.22 can hand a
        # stream it answers 502 an empty message first): not acknowledged, sent again
        self.mismatched = dict.fromkeys(TRANSPORTS, 0)
        self.errors: list[BaseException] = []

    def open_sessions(self) -> None:
        """Before any load: OpenSession is not idempotent, so no open may meet the kill."""
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            for i, t in enumerate(self.transport):
                if not t.startswith("oip"):
                    self.ids[i] = stub.OpenSession(pb.OpenSessionRequest(model=MODEL)).session_id

    def acknowledged(self, i: int, y: np.ndarray, started: float, retried: bool) -> None:
        with self.lock:
            self.outputs[i].append(y)
            self.done_steps += 1
            self.retried[self.transport[i]] += retried
            if not retried or self.killed_at is None:
                return
            if started < self.killed_at:
                self.recovered[self.transport[i]].append(time.monotonic() - self.killed_at)
            else:
                self.retried_later[self.transport[i]] += 1

    def mismatch(self, transport: str) -> None:
        with self.lock:
            self.mismatched[transport] += 1

    def run(self, rounds: range) -> None:
        threads = []
        for transport, count in WORKERS.items():
            mine = [i for i, t in enumerate(self.transport) if t == transport]
            for w in range(count):
                work = getattr(self, f"_{transport}")
                args = (mine[w::count], rounds)
                threads.append(threading.Thread(target=self._guarded, args=(work, *args)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def _guarded(self, work: Callable[[list[int], range], None], *args: Any) -> None:
        try:
            work(*args)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def _rounds(self, rounds: range) -> Iterator[int]:
        for k in rounds:
            if self.stop.is_set() or self.errors:
                return
            time.sleep(self.pause)
            yield k

    # -- rnnserve.v1 Step, through our client (it retries with the same step_index) --
    def _step(self, mine: list[int], rounds: range) -> None:
        with CountingClient(self.address, timeout=10, retries=RETRIES) as client:
            info = [pb.SessionInfo(session_id=self.ids[i], model=MODEL) for i in mine]
            for s in info:
                s.next_step_index = rounds.start
            sessions = {i: Session(client, s) for i, s in zip(mine, info, strict=True)}
            for k in self._rounds(rounds):
                for i, s in sessions.items():
                    client.retried, started = False, time.monotonic()
                    y = raw(s.step(self.chunks[i][k]))
                    self.acknowledged(i, y, started, client.retried)

    # -- rnnserve.v1 Session: one stream per session, kept open; a cut stream is opened again --
    def _session(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            streams: dict[int, Duplex] = {}
            try:
                for k in self._rounds(rounds):
                    for i in mine:
                        req = pb.StepRequest(
                            session_id=self.ids[i], step_index=k, input=to_input(self.chunks[i][k])
                        )
                        self._session_step(stub, streams, i, req)
            finally:
                for s in streams.values():
                    s.close()

    def _session_step(
        self, stub: pb_grpc.RnnServeStub, streams: dict[int, Duplex], i: int, req: pb.StepRequest
    ) -> None:
        started = time.monotonic()
        for attempt in range(RETRIES + 1):
            if i not in streams:
                streams[i] = Duplex(stub.Session, (("x-session-id", self.ids[i]),))
            try:
                streams[i].send(req)
                reply = streams[i].receive()
                if not answers(req, reply):
                    self.mismatch("session")
                    raise ReplyMismatch(f"{req.step_index} got {reply.step_index}")
            except (grpc.RpcError, ReplyMismatch) as e:
                streams.pop(i).close()
                if not resendable(e) or attempt == RETRIES:
                    raise
                backoff(attempt)
                continue
            self.acknowledged(i, raw(reply), started, attempt > 0)
            return

    # -- rnnserve.v1 StepMany, entries: a message of PER_MESSAGE sessions, retried entry by entry --
    def _entries(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            for k in self._rounds(rounds):
                for part in batches(mine):
                    steps = {
                        i: pb.StepRequest(
                            session_id=self.ids[i], step_index=k, input=to_input(self.chunks[i][k])
                        )
                        for i in part
                    }
                    self._entries_retried(stub, steps)

    def _entries_retried(
        self, stub: pb_grpc.RnnServeStub, steps: dict[int, pb.StepRequest]
    ) -> None:
        """Entries that failed UNAVAILABLE (or the whole call) are sent again with the same
        step_index, as our client's Step does."""
        todo, started = list(steps), time.monotonic()
        for attempt in range(RETRIES + 1):
            message = pb.StepManyRequest(steps=[steps[i] for i in todo])
            try:
                reply = one_reply(stub, message, steps[todo[0]].session_id)
                if not entries_answer(message, reply):
                    self.mismatch("entries")
                    raise ReplyMismatch(f"{len(reply.results)} results for {len(todo)} steps")
            except (grpc.RpcError, ReplyMismatch) as e:
                if not resendable(e) or attempt == RETRIES:
                    raise
                backoff(attempt)
                continue
            again = []
            for i, result in zip(todo, reply.results, strict=True):
                if result.HasField("reply"):
                    self.acknowledged(i, raw(result.reply), started, attempt > 0)
                elif result.error.code == "UNAVAILABLE":
                    again.append(i)
                else:
                    raise AssertionError(f"step failed: {result.error}")
            if not again:
                return
            todo = again
            backoff(attempt)
        raise AssertionError(f"StepMany entries still unanswered: {todo}")

    # -- rnnserve.v1 StepMany, packed: a block of PER_MESSAGE sessions, retried entry by entry --
    def _packed(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            for k in self._rounds(rounds):
                for part in batches(mine):
                    todo, started = part, time.monotonic()
                    for attempt in range(RETRIES + 1):
                        todo = self._packed_once(stub, todo, k, started, attempt)
                        if not todo:
                            break
                        backoff(attempt)
                    assert not todo, f"packed entries still unanswered: {todo}"

    def _packed_once(
        self, stub: pb_grpc.RnnServeStub, todo: list[int], k: int, started: float, attempt: int
    ) -> list[int]:
        """One packed block; the sessions still to answer (all of them when the call failed)."""
        x = np.stack([self.chunks[i][k] for i in todo])  # (N, T, F)
        block = pack_steps(MODEL, [self.ids[i] for i in todo], x, [k] * len(todo))
        try:
            reply = one_reply(stub, pb.StepManyRequest(packed=block), self.ids[todo[0]])
            r = PackedReply.from_message(reply.packed, len(todo), x.shape[1], [k] * len(todo))
        except ReplyMismatch:
            self.mismatch("packed")
            return todo
        except grpc.RpcError as e:
            if not retryable(e) or attempt == RETRIES:
                raise
            return todo
        again = []
        for at, i in enumerate(todo):
            if at not in r.errors:
                self.acknowledged(i, r.y[at], started, attempt > 0)
            elif r.errors[at].code == "UNAVAILABLE":
                again.append(i)
            else:
                raise AssertionError(f"packed step failed: {r.errors[at]}")
        return again

    # -- OIP ModelInfer: tritonclient's wire messages, each step numbered --
    def _oip(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            for k in self._rounds(rounds):
                for i in mine:
                    request = oip_request(i + 1, k, self.chunks[i][k])
                    affinity = (("x-session-id", f"oip:{MODEL}:{i + 1}"),)
                    started = time.monotonic()
                    for attempt in range(RETRIES + 1):
                        try:
                            reply = stub.ModelInfer(request, timeout=10, metadata=affinity)
                            if reply.id != request.id:  # the OIP reply echoes the request's id
                                self.mismatch("oip")
                                raise ReplyMismatch(f"{request.id} got {reply.id!r}")
                        except (grpc.RpcError, ReplyMismatch) as e:
                            if not resendable(e) or attempt == RETRIES:
                                raise
                            backoff(attempt)
                            continue
                        self.acknowledged(i, oip_y(reply), started, attempt > 0)
                        break

    # -- OIP ModelStreamInfer: one stream carries many sequences, PER_MESSAGE requests at a time --
    def _oip_stream(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            affinity = (("x-session-id", f"oip-stream:{mine[0]}"),)
            stream: list[Duplex] = []
            try:
                for k in self._rounds(rounds):
                    for part in batches(mine):
                        todo = [(i, oip_request(i + 1, k, self.chunks[i][k])) for i in part]
                        started = time.monotonic()
                        for attempt in range(RETRIES + 1):
                            if not stream:
                                stream.append(Duplex(stub.ModelStreamInfer, affinity))
                            todo = self._oip_stream_once(stream, todo, started, attempt)
                            if not todo:
                                break
                            stream.pop().close()  # off a replica that is going away
                            backoff(attempt)
                        assert not todo, f"stream requests still unanswered: {todo}"
            finally:
                for s in stream:
                    s.close()

    def _oip_stream_once(
        self, stream: list[Duplex], todo: list, started: float, attempt: int
    ) -> list:
        """Sends every request, reads the replies in order; the requests to send again."""
        for _, request in todo:
            stream[0].send(request)
        for n, (i, request) in enumerate(todo):
            try:
                reply = stream[0].receive()
            except grpc.RpcError as e:
                if not retryable(e) or attempt == RETRIES:
                    raise
                return todo[n:]
            if reply.error_message:
                if not reply.error_message.startswith("[UNAVAILABLE]"):
                    raise AssertionError(f"OIP stream step failed: {reply.error_message}")
                return todo[n:]  # the later ones are answered too; they are sent again as retries
            if reply.infer_response.id != request.id:
                self.mismatch("oip_stream")
                return todo[n:]  # this stream is not to be trusted further: a new one resends
            self.acknowledged(i, oip_y(reply.infer_response), started, attempt > 0)
        return []


def batches(items: list[int]) -> Iterator[list[int]]:
    for at in range(0, len(items), PER_MESSAGE):
        yield items[at : at + PER_MESSAGE]


def resendable(error: Exception) -> bool:
    """A step whose reply was lost (a retryable status, or a reply to something else)."""
    return isinstance(error, ReplyMismatch) or retryable(error)  # type: ignore[arg-type]


def entries_answer(message: pb.StepManyRequest, reply: pb.StepManyResponse) -> bool:
    """One result per entry, each (if it is a reply) answering its entry."""
    if len(reply.results) != len(message.steps):
        return False
    return all(
        answers(step, result.reply)
        for step, result in zip(message.steps, reply.results, strict=True)
        if result.HasField("reply")
    )


def one_reply(stub: pb_grpc.RnnServeStub, message: pb.StepManyRequest, affinity: str) -> Any:
    """One StepMany message on a stream of its own, and its reply."""
    call = stub.StepMany(iter([message]), timeout=10, metadata=(("x-session-id", affinity),))
    return next(iter(call))


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "(none)"
    ms = np.array(seconds) * 1e3
    return (
        f"p50 {np.percentile(ms, 50):.0f} ms, p99 {np.percentile(ms, 99):.0f} ms "
        f"(first {ms.min():.0f} ms)"
    )


def test_a_killed_replica_loses_no_step_and_a_full_restart_continues_every_session(
    quick_store: Path, cluster: Cluster
) -> None:
    assert cluster.nginx is not None
    load = Load(quick_store, cluster.nginx.address, SESSIONS, STEPS + 1)
    load.open_sessions()
    victim = cluster.replicas[1]
    total = SESSIONS * STEPS

    def kill_mid_load() -> None:
        while load.done_steps < total // 3 and not load.errors:
            time.sleep(0.005)
        with load.lock:
            load.killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_mid_load)
    killer.start()
    load.run(range(STEPS))
    killer.join()
    assert not load.errors, load.errors[:3]
    assert victim.wait() == -signal.SIGKILL
    assert load.done_steps == total
    recovered = [s for seconds in load.recovered.values() for s in seconds]
    assert recovered or any(load.retried_later.values()), "no step was retried after the kill"
    print(
        f"\nfailover: {len(recovered)} steps in flight at the kill were retried and answered "
        f"{percentiles(recovered)} after it; steps retried by transport (in flight at the kill "
        "+ sent later, e.g. on a stream the kill cut): "
        + ", ".join(f"{t} {len(load.recovered[t])}+{n}" for t, n in load.retried_later.items())
        + mismatched(load)
    )

    cluster.restart_replicas()  # every replica at once, the victim included
    load.run(range(STEPS, STEPS + 1))
    assert not load.errors, load.errors[:3]

    assert_equals_offline(quick_store, load)


def mismatched(load: Load) -> str:
    """The replies that answered something else, if any (see ``Load.mismatched``)."""
    if not any(load.mismatched.values()):
        return ""
    return "; replies that did not answer their request, sent again: " + ", ".join(
        f"{t} {n}" for t, n in load.mismatched.items() if n
    )


def assert_equals_offline(store: Path, load: Load) -> None:
    """Each session's acknowledged outputs against eager over the same chunks, in order. Sessions
    here run up to ~150 time steps, over which float32 drift between batched ONNX Runtime and
    eager grows past 1e-5 near |y| = 1; a lost or repeated step moves outputs far more than 1e-4."""
    wanted = Reference(store).run_many(
        MODEL, [load.chunks[i][: len(load.outputs[i])] for i in range(load.sessions)]
    )
    for i, want in enumerate(wanted):
        got = np.concatenate(load.outputs[i])
        np.testing.assert_allclose(
            got, want, atol=LONG_TOL, rtol=0, err_msg=f"session {i} ({load.transport[i]})"
        )


def wait_for_progress(load: Load, steps: int, timeout: float = 30.0) -> None:
    target, deadline = load.done_steps + steps, time.monotonic() + timeout
    while load.done_steps < target and not load.errors:
        assert time.monotonic() < deadline, "the clients made no progress"
        time.sleep(0.01)


def test_a_rolling_restart_under_load_loses_nothing_and_every_call_succeeds(
    quick_store: Path, cluster: Cluster
) -> None:
    assert cluster.nginx is not None
    load = Load(quick_store, cluster.nginx.address, ROLLING_SESSIONS, ROLLING_ROUNDS)
    load.open_sessions()
    load.pause = 0.05
    clients = threading.Thread(target=load.run, args=(range(ROLLING_ROUNDS),))
    clients.start()
    try:
        restarts: list[float] = []
        for r in cluster.replicas:  # one at a time: drain (SIGTERM), restart, wait until serving
            wait_for_progress(load, ROLLING_SESSIONS)  # each SIGTERM lands in the middle of load
            t0 = time.monotonic()
            r.signal(signal.SIGTERM)
            assert r.wait() == 0, r.log.read_text()[-2000:]
            r.start()
            r.wait_serving()
            restarts.append(time.monotonic() - t0)
        wait_for_progress(load, ROLLING_SESSIONS)
    finally:
        load.stop.set()
        clients.join(60)
    assert not load.errors, load.errors[:3]
    rounds = min(len(o) for o in load.outputs)
    print(
        f"\nrolling restart: {load.done_steps} steps, every session {rounds}+ rounds, "
        f"each replica back in {', '.join(f'{t:.1f}' for t in restarts)} s; steps answered by "
        "a retry: " + ", ".join(f"{t} {n}" for t, n in load.retried.items()) + mismatched(load)
    )
    assert_equals_offline(quick_store, load)
