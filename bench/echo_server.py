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

    python -m bench.echo_server --store STORE [--address 127.0.0.1:0]

prints ``echo: listening on 127.0.0.1:PORT`` once it serves, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import secrets
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.grpc_api import output_message
from serving.manifest import Manifest, list_models, list_versions, load_manifest, resolve
from serving.server import ServerConfig

MAX_MESSAGE_BYTES = ServerConfig.max_message_bytes  # the real server's default


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


def load_models(store: Path) -> dict[str, Canned]:
    models = {}
    for name in list_models(store):
        m = load_manifest(resolve(store, name, list_versions(store, name)[-1]))
        if m.streamable:
            models[name] = Canned.of(m)
    return models


async def serve(store: Path, address: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_RnnServeServicer_to_server(EchoServicer(load_models(store)), server)
    port = server.add_insecure_port(address)
    await server.start()
    host = address.rsplit(":", 1)[0]
    print(f"echo: listening on {host}:{port}", flush=True)
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
    args = p.parse_args()
    asyncio.run(serve(args.store, args.address))


if __name__ == "__main__":
    main()
