"""The transport floor: an ``rnnserve.v1.RnnServe`` server that answers without any model.

It speaks our generated messages (``serving._proto``) on the same grpc.aio stack and server options
as ``serving.server``, so a client sees the same message shapes and sizes: each Step, Session and
StepMany reply is a copy of a canned ``StepResponse`` holding what the real model's reply holds
(built with ``grpc_api.output_message`` from the store's manifest and a zero head output), with
the request's session id and step index filled in. A packed StepMany block gets a
``PackedResults`` of the real one's size: zero (N, T, O) outputs and, for classifiers and char
models, (N, T, K) probabilities and N*T indexes, with the block's step indexes echoed. No model is
loaded and no state is kept besides which model a session id belongs to, so whatever the real
server costs beyond this is ours.

With ``--model NAME [NAME ...]`` it is **echo+model**: it serves only those models and every step
it answers also pays the model's step-graph call in ONNX Runtime (1 intra-op thread, 1 inter-op,
sequential, as ``serving.backends.OnnxBackend``), batched like our scheduler at its simplest: the
rows submitted in one event-loop turn (unary Steps, stream steps, StepMany steps, packed block
rows) run as one call on the loop thread, at most the real server's ``max_batch_size`` (256) rows
per call (the rest in the next turn's call), on zero inputs and zero states. It does no more than
that: the inputs are not decoded, no state is stored or gathered, the replies are the echo's canned
ones (not built from the outputs). So echo+model over echo is what the model call alone costs, and
rnnserve over echo+model what all our per-step work around the call costs on top: the session
lookup and step-index gate, decoding the inputs, the state gather/scatter, the replies.

    python -m bench.echo_server --store STORE [--address 127.0.0.1:0] [--model NAME ...]

prints ``echo: listening on 127.0.0.1:PORT`` (``echo+model: ...`` with ``--model``) once it
serves, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import secrets
import signal
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.engine import EngineConfig
from serving.grpc_api import output_message
from serving.manifest import Manifest, list_models, list_versions, load_manifest, resolve
from serving.server import ServerConfig

MAX_MESSAGE_BYTES = ServerConfig.max_message_bytes  # the real server's default
MAX_BATCH_ROWS = EngineConfig.max_batch_size  # rows in one model call, as the real server's default


def canned_reply(m: Manifest) -> pb.StepResponse:
    """A one-time-step StepResponse shaped like the real one for this model."""
    y = np.zeros(m.output.size, dtype=np.float32)  # (O,)
    return pb.StepResponse(outputs=[output_message(m, y)], expires_at=1.0e9)


@dataclass(frozen=True)
class Canned:
    """What the echo server answers for one model."""

    reply: pb.StepResponse  # one time step of one session
    outputs: int  # O: head outputs per time step
    classes: int  # K: probabilities per time step (0 for regression)

    @classmethod
    def of(cls, m: Manifest) -> Canned:
        classes = 0 if m.output.kind == "regression" else len(m.labels)
        return cls(canned_reply(m), m.output.size, classes)


@functools.lru_cache(maxsize=64)
def canned_block(outputs: int, classes: int, rows: int) -> tuple[bytes, bytes, list[int]]:
    """(raw, probabilities, index) of a PackedResults with ``rows`` = N*T time steps."""
    return bytes(4 * rows * outputs), bytes(4 * rows * classes), [0] * rows if classes else []


class EchoServicer(pb_grpc.RnnServeServicer):
    def __init__(self, models: dict[str, Canned]) -> None:
        self._models = models  # model name -> what to answer
        self._sessions: dict[str, str] = {}  # session id -> model name

    async def OpenSession(self, request, context):
        if request.model not in self._models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model!r}")
        session_id = secrets.token_urlsafe(16)
        self._sessions[session_id] = request.model
        return pb.SessionInfo(session_id=session_id, model=request.model, version=1)

    async def CloseSession(self, request, context):
        self._sessions.pop(request.session_id, None)
        return pb.CloseSessionResponse()

    async def Step(self, request, context):
        return self._echo(request.session_id, request)

    async def Session(self, request_iterator, context):
        session_id = ""
        async for request in request_iterator:
            session_id = session_id or request.session_id
            yield self._echo(session_id, request)

    async def StepMany(self, request_iterator, context):
        async for message in request_iterator:
            if message.HasField("packed"):
                if message.packed.model not in self._models:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "unknown model")
                yield pb.StepManyResponse(packed=self._echo_block(message.packed))
                continue
            results = [
                pb.StepResult(session_id=s.session_id, reply=self._echo(s.session_id, s))
                for s in message.steps
            ]
            yield pb.StepManyResponse(results=results)

    def _echo(self, session_id: str, request: pb.StepRequest) -> pb.StepResponse:
        reply = pb.StepResponse()
        reply.CopyFrom(self._models[self._sessions[session_id]].reply)
        reply.session_id = session_id
        reply.step_index = request.step_index
        return reply

    def _echo_block(self, packed: pb.PackedSteps) -> pb.PackedResults:
        n = len(packed.session_ids)
        canned = self._models[packed.model]
        raw, probabilities, index = canned_block(
            canned.outputs, canned.classes, n * (packed.steps or 1)
        )
        return pb.PackedResults(
            step_indexes=packed.step_indexes or [0] * n,
            raw=raw,
            probabilities=probabilities,
            index=index,
            expires_at=1.0e9,
        )


class StepGraph:
    """One model's ``step`` graph in ONNX Runtime, run on zeros: the compute a step costs."""

    def __init__(self, m: Manifest, version_dir: Path) -> None:
        opts = ort.SessionOptions()  # as serving.backends.OnnxBackend sets them
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        graph = m.graphs["step"]
        self._session = ort.InferenceSession(
            str(version_dir / graph.onnx), opts, providers=["CPUExecutionProvider"]
        )
        self._inputs, self._outputs = graph.inputs, graph.outputs
        self._manifest = m

    def run(self, rows: int, steps: int) -> None:
        """One call at batch ``rows``, ``steps`` time steps each; the outputs are dropped."""
        m = self._manifest
        if m.input.kind == "tokens":
            x = np.zeros((rows, steps), dtype=np.int64)  # (B, T)
        else:
            x = np.zeros((rows, steps, m.input.features), dtype=np.float32)  # (B, T, F)
        states = [np.zeros(s.shape(rows), dtype=s.dtype) for s in m.state]  # [(L, B, H)]
        self._session.run(self._outputs, dict(zip(self._inputs, [x, *states], strict=True)))


@dataclass
class Waiting:
    """Rows of one submit still to run, and the future that resolves once they all ran."""

    rows: int
    steps: int  # T
    future: asyncio.Future[None]


class TurnBatcher:
    """Batches like our scheduler at its simplest: the first submit schedules a call with
    ``call_soon``, so every row submitted in that event-loop turn can join it; a call takes at most
    ``max_rows`` rows (the real server's ``max_batch_size``) of the first waiting item's T, in
    order, splitting an item that does not fit; what is left runs in the next turn's call. Calls
    run on the loop thread (no executor). ``calls`` and ``rows`` count what ran, for tests."""

    def __init__(self, graph: StepGraph, max_rows: int = MAX_BATCH_ROWS) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self._graph = graph
        self.max_rows = max_rows
        self._queue: deque[Waiting] = deque()
        self.calls = 0
        self.rows = 0

    def submit(self, rows: int, steps: int = 1) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._run)
        self._queue.append(Waiting(rows, steps, future))
        return future

    def _run(self) -> None:
        steps, taken = self._take()
        rows = sum(n for n, _ in taken)
        error = None
        try:
            self._graph.run(rows, steps)
        except Exception as e:  # answer the RPCs with it instead of leaving them hanging
            error = e
        self.calls += 1
        self.rows += rows
        if error is not None:  # an item split by this call does not run its other rows
            failed = {id(w) for _, w in taken}
            self._queue = deque(w for w in self._queue if id(w) not in failed)
        for _, w in taken:
            if error is not None or not w.rows:
                settle(w.future, error)
        if self._queue:
            asyncio.get_running_loop().call_soon(self._run)

    def _take(self) -> tuple[int, list[tuple[int, Waiting]]]:
        """(T, [(rows taken, item)]): up to max_rows rows of the first item's T, in order."""
        steps, room = self._queue[0].steps, self.max_rows
        taken = []
        for w in self._queue:
            if not room:
                break
            if w.steps == steps:
                n = min(w.rows, room)
                w.rows -= n
                room -= n
                taken.append((n, w))
        self._queue = deque(w for w in self._queue if w.rows)
        return steps, taken


def settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():  # the RPC was cancelled meanwhile
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class EchoModelServicer(EchoServicer):
    """The echo, but each answered step first waits for its share of a batched model call."""

    def __init__(self, models: dict[str, Canned], batchers: dict[str, TurnBatcher]) -> None:
        super().__init__(models)
        self.batchers = batchers  # model name -> its turn batcher

    async def Step(self, request, context):
        await self.batchers[self._sessions[request.session_id]].submit(1)
        return self._echo(request.session_id, request)

    async def Session(self, request_iterator, context):
        session_id = ""
        async for request in request_iterator:
            session_id = session_id or request.session_id
            await self.batchers[self._sessions[session_id]].submit(1)
            yield self._echo(session_id, request)

    async def StepMany(self, request_iterator, context):
        async for message in request_iterator:
            if message.HasField("packed"):
                packed = message.packed
                if packed.model not in self._models:
                    await context.abort(grpc.StatusCode.NOT_FOUND, "unknown model")
                await self.batchers[packed.model].submit(len(packed.session_ids), packed.steps or 1)
                yield pb.StepManyResponse(packed=self._echo_block(packed))
                continue
            per_model = Counter(self._sessions[s.session_id] for s in message.steps)
            for future in [self.batchers[m].submit(n) for m, n in per_model.items()]:
                await future  # all submitted in this turn: one call per model
            results = [
                pb.StepResult(session_id=s.session_id, reply=self._echo(s.session_id, s))
                for s in message.steps
            ]
            yield pb.StepManyResponse(results=results)


def latest_manifests(store: Path) -> dict[str, tuple[Manifest, Path]]:
    """Each streamable model's latest version: (manifest, version folder)."""
    found = {}
    for name in list_models(store):
        version_dir = resolve(store, name, list_versions(store, name)[-1])
        m = load_manifest(version_dir)
        if m.streamable:
            found[name] = (m, version_dir)
    return found


def load_models(store: Path) -> dict[str, Canned]:
    return {name: Canned.of(m) for name, (m, _) in latest_manifests(store).items()}


def echo_model_servicer(store: Path, names: list[str]) -> EchoModelServicer:
    """echo+model for ``names`` only (each a streamable model of the store)."""
    found = latest_manifests(store)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"{store} has no streamable {', '.join(missing)}")
    models = {n: Canned.of(found[n][0]) for n in names}
    batchers = {n: TurnBatcher(StepGraph(*found[n])) for n in names}
    return EchoModelServicer(models, batchers)


def servicer_for(store: Path, model_calls: list[str] | None = None) -> EchoServicer:
    """The plain echo of every streamable model, or echo+model for ``model_calls``."""
    if model_calls:
        return echo_model_servicer(store, model_calls)
    return EchoServicer(load_models(store))


def create_server(servicer: EchoServicer, address: str) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the real one's options, bound, not started (call in a loop)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_RnnServeServicer_to_server(servicer, server)
    return server, server.add_insecure_port(address)


async def serve(servicer: EchoServicer, address: str) -> None:
    server, port = create_server(servicer, address)
    await server.start()
    host = address.rsplit(":", 1)[0]
    name = "echo+model" if isinstance(servicer, EchoModelServicer) else "echo"
    print(f"{name}: listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True, help="model store (manifests only)")
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--model", nargs="+", action="extend", metavar="NAME", help="echo+model: "
                   "serve only these models, each step paying the step-graph call")  # fmt: skip
    args = p.parse_args()
    try:
        servicer = servicer_for(args.store, args.model)
    except ValueError as e:  # a --model the store does not stream
        p.error(str(e))
    asyncio.run(serve(servicer, args.address))


if __name__ == "__main__":
    main()
