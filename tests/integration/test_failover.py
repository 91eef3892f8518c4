"""Failover with real processes: three native replicas on one Redis behind nginx (grpc_pass over
HTTP/2), clients stepping 200 sessions, one replica killed with SIGKILL mid-load, then every
replica restarted together. Every session's outputs must equal the uninterrupted offline run
(tests/eager.py): no acknowledged step lost, none applied twice."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, raw, to_input
from lb_support import Nginx, Replica
from redis_support import RedisProcess

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import Client, Session, retryable

MODEL = "seq_lstm"
SESSIONS = 200
STEPS = 10
UNARY_WORKERS = 6  # each steps its sessions one by one through our client (retries built in)
MANY_WORKERS = 2  # each steps its sessions as one StepMany message per round, retried whole
RETRIES = 12
LONG_TOL = 10 * TOL
ROLLING_SESSIONS = 48
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


class Load:
    """The clients: every session's chunks, the outputs acknowledged, timing around the kill."""

    def __init__(self, store: Path, address: str, sessions: int, rounds: int) -> None:
        rng = np.random.default_rng(11)
        m = manifest(store, MODEL)
        self.address = address
        self.sessions = sessions
        self.chunks = [
            [random_chunk(m, rng, int(t)) for t in rng.integers(1, 4, size=rounds)]
            for _ in range(sessions)
        ]
        self.outputs: list[list[np.ndarray]] = [[] for _ in range(sessions)]
        self.ids: list[str] = [""] * sessions
        self.stop = threading.Event()  # set: every worker ends after its current round
        self.pause = 0.0  # seconds between a worker's rounds
        self.done_steps = 0
        self.lock = threading.Lock()
        self.killed_at: float | None = None
        self.recovered: list[float] = []  # per step in flight at the kill: seconds to its answer
        self.errors: list[BaseException] = []

    def acknowledged(self, started: float) -> None:
        with self.lock:
            self.done_steps += 1
            if self.killed_at is not None and started < self.killed_at:
                self.recovered.append(time.monotonic() - self.killed_at)

    def run(self, rounds: range) -> None:
        workers = UNARY_WORKERS + MANY_WORKERS
        threads = [
            threading.Thread(target=self._guarded, args=(w, workers, rounds))
            for w in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def _guarded(self, w: int, workers: int, rounds: range) -> None:
        try:
            mine = list(range(w, self.sessions, workers))
            if w < UNARY_WORKERS:
                self._unary(mine, rounds)
            else:
                self._step_many(mine, rounds)
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def _unary(self, mine: list[int], rounds: range) -> None:
        with Client(self.address, timeout=10, retries=RETRIES) as client:
            sessions = {i: client.session(MODEL) for i in mine} if rounds.start == 0 else {}
            for i, s in sessions.items():
                self.ids[i] = s.id
            if not sessions:
                sessions = {i: _resume(client, self.ids[i], rounds.start) for i in mine}
            for k in rounds:
                if self.stop.is_set():
                    return
                time.sleep(self.pause)
                for i, s in sessions.items():
                    started = time.monotonic()
                    self.outputs[i].append(raw(s.step(self.chunks[i][k])))
                    self.acknowledged(started)

    def _step_many(self, mine: list[int], rounds: range) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            if rounds.start == 0:
                for i in mine:
                    self.ids[i] = stub.OpenSession(pb.OpenSessionRequest(model=MODEL)).session_id
            for k in rounds:
                if self.stop.is_set():
                    return
                time.sleep(self.pause)
                started = time.monotonic()
                steps = [
                    pb.StepRequest(
                        session_id=self.ids[i], step_index=k, input=to_input(self.chunks[i][k])
                    )
                    for i in mine
                ]
                for i, result in zip(mine, _step_many_retried(stub, steps), strict=True):
                    self.outputs[i].append(raw(result))
                    self.acknowledged(started)


def _resume(client: Client, sid: str, next_index: int) -> Session:
    return Session(client, pb.SessionInfo(session_id=sid, model=MODEL, next_step_index=next_index))


def _step_many_retried(stub: pb_grpc.RnnServeStub, steps: list[pb.StepRequest]) -> list:
    """One StepMany message; entries that failed UNAVAILABLE (or the whole call) are sent again
    with the same step_index, as our client's Step does."""
    answers: list[pb.StepResponse | None] = [None] * len(steps)
    for attempt in range(RETRIES + 1):
        todo = [j for j, a in enumerate(answers) if a is None]
        if not todo:
            break
        metadata = (("x-session-id", steps[todo[0]].session_id),)
        try:
            reply = next(
                iter(stub.StepMany(iter([pb.StepManyRequest(steps=[steps[j] for j in todo])]),
                                   timeout=10, metadata=metadata))
            )  # fmt: skip
        except grpc.RpcError as e:
            if not retryable(e):
                raise
            time.sleep(min(0.05 * 2**attempt, 1.0))
            continue
        for j, result in zip(todo, reply.results, strict=True):
            if result.HasField("reply"):
                answers[j] = result.reply
            elif result.error.code != "UNAVAILABLE":
                raise AssertionError(f"step failed: {result.error}")
    assert all(a is not None for a in answers), "StepMany entries still unanswered"
    return answers


def test_a_killed_replica_loses_no_step_and_a_full_restart_continues_every_session(
    quick_store: Path, cluster: Cluster
) -> None:
    assert cluster.nginx is not None
    load = Load(quick_store, cluster.nginx.address, SESSIONS, STEPS + 1)
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
    assert load.recovered, "no step was in flight at the kill"
    recovered = np.array(load.recovered)
    print(
        f"\nfailover: {len(recovered)} steps in flight at the kill answered after "
        f"p50 {np.percentile(recovered, 50) * 1e3:.0f} ms, max {recovered.max() * 1e3:.0f} ms"
    )

    cluster.restart_replicas()  # every replica at once, the victim included
    load.run(range(STEPS, STEPS + 1))
    assert not load.errors, load.errors[:3]

    assert_equals_offline(quick_store, load)


def assert_equals_offline(store: Path, load: Load) -> None:
    """Each session's acknowledged outputs against eager over the same chunks, in order. Sessions
    here run up to ~150 time steps, over which float32 drift between batched ONNX Runtime and
    eager grows past 1e-5 near |y| = 1; a lost or repeated step moves outputs far more than 1e-4."""
    reference = Reference(store)
    for i in range(load.sessions):
        n = len(load.outputs[i])
        want = reference.run(MODEL, load.chunks[i][:n])
        got = np.concatenate(load.outputs[i])
        np.testing.assert_allclose(got, want, atol=LONG_TOL, rtol=0, err_msg=f"session {i}")


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
        f"each replica back in {', '.join(f'{t:.1f}' for t in restarts)} s"
    )
    assert_equals_offline(quick_store, load)
