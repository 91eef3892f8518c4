"""Closed-loop load: client worker processes driving our API (or the echo server) over loopback.

Python gRPC clients are CPU-bound (a unary call costs the client about as much as the server), so
the load comes from ``workers`` separate processes, each with its own grpc.aio channel and event
loop, and the server runs in yet another process. A controller (``bench.run``) sends each worker
commands over a pipe and every worker answers with a plain dict:

* ``open``: open ``count`` sessions of a model on a target (kept per (target, model));
* ``run``: drive those sessions for one timed window, on one path:
  - ``unary``: one coroutine per session, ``Step`` after ``Step`` (each waits for its reply);
  - ``stream``: one ``Session`` bidi stream per session, write one step, read its reply, repeat;
  - ``stepmany``: the sessions in groups of ``per_message``; one ``StepMany`` stream per group,
    one message (a step for every session of the group) in flight at a time;
  - ``packed``: as ``stepmany``, but each message is one ``PackedSteps`` block (the group's
    inputs as one float32 buffer) and each reply one ``PackedResults``;
  the window is given in wall-clock time so that all workers measure the same interval: steps
  that complete inside it are counted, with their round-trip latency (per message for StepMany);
* ``close``: close the sessions; ``exit``.

Every reply is checked (its step index; every StepMany entry being a reply, not an error; every
packed reply answering exactly the step indexes sent, without errors), so a fast-but-wrong server
cannot pass.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import grpc
import numpy as np

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import make_input, pack_steps

FEATURES = {"seq_lstm": 10, "sine": 1}
GROUPED = ("stepmany", "packed")  # paths that carry ``per_message`` sessions per message
OPEN_CONCURRENCY = 64


@dataclass
class SessionSet:
    ids: list[str]
    next_index: list[int] = field(default_factory=list)


@dataclass
class Window:
    """Where counting starts and ends, on this process's perf_counter clock."""

    start: float
    end: float

    @classmethod
    def from_wall(cls, start_at: float, warmup: float, duration: float) -> Window:
        offset = time.perf_counter() - time.time()
        begin = start_at + warmup + offset
        return cls(begin, begin + duration)


@dataclass
class Tally:
    steps: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, one per round trip

    def record(self, window: Window, t0: float, t1: float, steps: int) -> None:
        if window.start <= t1 <= window.end:
            self.steps += steps
            self.latencies.append(t1 - t0)


def random_input(model: str, rng: np.random.Generator) -> pb.Input:
    """One time step of random features, as the Python client sends it."""
    return make_input(rng.uniform(-1.0, 1.0, size=(1, FEATURES[model])))  # (T=1, F)


class Worker:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.sessions: dict[tuple[str, str], SessionSet] = {}

    def stub(self, target: str) -> pb_grpc.RnnServeStub:
        if target not in self.channels:
            self.channels[target] = grpc.aio.insecure_channel(target)
        return pb_grpc.RnnServeStub(self.channels[target])

    async def open(self, target: str, model: str, count: int) -> dict[str, Any]:
        stub = self.stub(target)
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one() -> str:
            async with gate:
                info = await stub.OpenSession(pb.OpenSessionRequest(model=model), timeout=30)
                return info.session_id

        ids = list(await asyncio.gather(*(one() for _ in range(count))))
        self.sessions[(target, model)] = SessionSet(ids, [0] * count)
        return {"opened": count}

    async def close(self, target: str, model: str) -> dict[str, Any]:
        stub = self.stub(target)
        sessions = self.sessions.pop((target, model), SessionSet([]))
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)

        async def one(session_id: str) -> None:
            async with gate:
                await stub.CloseSession(pb.CloseSessionRequest(session_id=session_id), timeout=30)

        await asyncio.gather(*(one(s) for s in sessions.ids))
        return {"closed": len(sessions.ids)}

    async def run(
        self, target: str, model: str, path: str, per_message: int, window: Window
    ) -> dict[str, Any]:
        sessions = self.sessions.get((target, model), SessionSet([]))
        stub = self.stub(target)
        tally = Tally()
        n = len(sessions.ids)
        if path in GROUPED:
            groups = [list(range(i, min(i + per_message, n))) for i in range(0, n, per_message)]
            loop = self._stepmany if path == "stepmany" else self._packed
            jobs = [loop(stub, model, sessions, g, window, tally) for g in groups]
        else:
            loop = self._unary if path == "unary" else self._stream
            jobs = [loop(stub, model, sessions, i, window, tally) for i in range(n)]
        await asyncio.gather(*jobs)
        return {"steps": tally.steps, "latencies": tally.latencies}

    async def _unary(self, stub, model: str, s: SessionSet, i: int, w: Window, tally: Tally):
        req = pb.StepRequest(session_id=s.ids[i], input=random_input(model, self.rng))
        while (t0 := time.perf_counter()) < w.end:
            req.step_index = s.next_index[i]
            reply = await stub.Step(req)
            t1 = time.perf_counter()
            check_index(reply, s.next_index[i])
            s.next_index[i] += 1
            tally.record(w, t0, t1, 1)

    async def _stream(self, stub, model: str, s: SessionSet, i: int, w: Window, tally: Tally):
        req = pb.StepRequest(session_id=s.ids[i], input=random_input(model, self.rng))
        call = stub.Session()
        while (t0 := time.perf_counter()) < w.end:
            req.step_index = s.next_index[i]
            await call.write(req)
            reply = await call.read()
            t1 = time.perf_counter()
            check_index(reply, s.next_index[i])
            s.next_index[i] += 1
            tally.record(w, t0, t1, 1)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF

    async def _stepmany(
        self, stub, model: str, s: SessionSet, group: list[int], w: Window, tally: Tally
    ):
        message = pb.StepManyRequest(
            steps=[
                pb.StepRequest(session_id=s.ids[i], input=random_input(model, self.rng))
                for i in group
            ]
        )
        call = stub.StepMany()
        while (t0 := time.perf_counter()) < w.end:
            for entry, i in zip(message.steps, group, strict=True):
                entry.step_index = s.next_index[i]
            await call.write(message)
            reply = await call.read()
            t1 = time.perf_counter()
            check_many(reply, len(group))
            for i in group:
                s.next_index[i] += 1
            tally.record(w, t0, t1, len(group))
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF

    async def _packed(
        self, stub, model: str, s: SessionSet, group: list[int], w: Window, tally: Tally
    ):
        x = self.rng.uniform(-1.0, 1.0, size=(len(group), 1, FEATURES[model]))  # (N, T=1, F)
        message = pb.StepManyRequest(packed=pack_steps(model, [s.ids[i] for i in group], x))
        indexes = message.packed.step_indexes
        call = stub.StepMany()
        while (t0 := time.perf_counter()) < w.end:
            sent = [s.next_index[i] for i in group]
            indexes[:] = sent
            await call.write(message)
            reply = await call.read()
            t1 = time.perf_counter()
            check_packed(reply.packed, sent)
            for i in group:
                s.next_index[i] += 1
            tally.record(w, t0, t1, len(group))
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF


def check_index(reply: pb.StepResponse, expected: int) -> None:
    if reply.step_index != expected:
        raise AssertionError(f"reply answers step {reply.step_index}, expected {expected}")


def check_many(reply: pb.StepManyResponse, entries: int) -> None:
    if len(reply.results) != entries:
        raise AssertionError(f"{len(reply.results)} results for {entries} entries")
    for r in reply.results:
        if r.HasField("error"):
            raise AssertionError(f"StepMany entry failed: {r.error.code} {r.error.message}")


def check_packed(reply: pb.PackedResults, sent: list[int]) -> None:
    if reply.errors:
        e = reply.errors[0]
        raise AssertionError(f"packed entry {e.position} failed: {e.error.code} {e.error.message}")
    if list(reply.step_indexes) != sent:
        got = list(reply.step_indexes)
        raise AssertionError(f"packed reply answers steps {got[:4]}…, sent {sent[:4]}…")


def serve_commands(conn: Connection, seed: int) -> None:
    """A worker process's main: one command at a time from the controller, until ``exit``."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)  # grpc.aio looks the loop up; without this it polls far slower
    worker = Worker(seed)
    while True:
        cmd, kwargs = conn.recv()
        if cmd == "exit":
            break
        try:
            if cmd == "run":
                kwargs["window"] = Window.from_wall(**kwargs.pop("window"))
            answer = loop.run_until_complete(getattr(worker, cmd)(**kwargs))
        except Exception as e:  # report to the controller instead of dying silently
            answer = {"error": f"{type(e).__name__}: {e}"}
        conn.send(answer)
    for channel in worker.channels.values():
        loop.run_until_complete(channel.close())
    loop.close()
    conn.close()


class Workers:
    """The controller's handle on ``count`` worker processes."""

    def __init__(self, count: int) -> None:
        ctx = mp.get_context("spawn")  # no inherited gRPC state from the controller
        self.conns: list[Connection] = []
        self.procs = []
        for i in range(count):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=serve_commands, args=(theirs, i), daemon=True)
            proc.start()
            self.conns.append(mine)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.conns)

    def call(self, per_worker: list[tuple[str, dict[str, Any]] | None]) -> list[dict[str, Any]]:
        """Send each worker its command (None = idle) and wait for every answer."""
        busy = [(c, cmd) for c, cmd in zip(self.conns, per_worker, strict=True) if cmd]
        for conn, cmd in busy:
            conn.send(cmd)
        answers = [conn.recv() for conn, _ in busy]
        errors = [a["error"] for a in answers if "error" in a]
        if errors:
            raise RuntimeError(f"load worker failed: {errors[0]}")
        return answers

    def close(self) -> None:
        for conn in self.conns:
            conn.send(("exit", {}))
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
