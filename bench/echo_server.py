"""The transport floor: an ``rnnserve.v1.RnnServe`` server that answers without any model.

It speaks our generated messages (``serving._proto``) on the same grpc.aio stack and server options
as ``serving.server``, so a client sees the same message shapes and sizes: each Step, Session and
StepMany reply is a copy of a canned ``StepResponse`` holding what the real model's reply holds
(built with ``grpc_api.output_message`` from the store's manifest and a zero head output), with
the request's session id and step index filled in. No model is loaded and no state is kept besides
which model a session id belongs to, so whatever the real server costs beyond this is ours.

    python -m bench.echo_server --store STORE [--address 127.0.0.1:0]

prints ``echo: listening on 127.0.0.1:PORT`` once it serves, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
from pathlib import Path

import grpc
import numpy as np

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.grpc_api import output_message
from serving.manifest import Manifest, list_models, list_versions, load_manifest, resolve

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # as serving.server.ServerConfig


def canned_reply(m: Manifest) -> pb.StepResponse:
    """A one-time-step StepResponse shaped like the real one for this model."""
    y = np.zeros(m.output.size, dtype=np.float32)  # (O,)
    return pb.StepResponse(outputs=[output_message(m, y)], expires_at=1.0e9)


class EchoServicer(pb_grpc.RnnServeServicer):
    def __init__(self, replies: dict[str, pb.StepResponse]) -> None:
        self._replies = replies  # model name -> canned reply
        self._sessions: dict[str, str] = {}  # session id -> model name

    async def OpenSession(self, request, context):
        if request.model not in self._replies:
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
            results = [
                pb.StepResult(session_id=s.session_id, reply=self._echo(s.session_id, s))
                for s in message.steps
            ]
            yield pb.StepManyResponse(results=results)

    def _echo(self, session_id: str, request: pb.StepRequest) -> pb.StepResponse:
        reply = pb.StepResponse()
        reply.CopyFrom(self._replies[self._sessions[session_id]])
        reply.session_id = session_id
        reply.step_index = request.step_index
        return reply


def load_replies(store: Path) -> dict[str, pb.StepResponse]:
    replies = {}
    for name in list_models(store):
        m = load_manifest(resolve(store, name, list_versions(store, name)[-1]))
        if m.streamable:
            replies[name] = canned_reply(m)
    return replies


async def serve(store: Path, address: str) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_RnnServeServicer_to_server(EchoServicer(load_replies(store)), server)
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
