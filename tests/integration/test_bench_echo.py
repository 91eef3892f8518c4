"""echo+model over loopback gRPC (an in-process grpc.aio server): every RPC form answered
exactly as the plain echo answers it, while each answered step pays its share of a real
step-graph call. The batching itself is unit-tested in tests/unit/test_bench.py."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from bench import echo_server
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.client import make_input, pack_steps
from serving.manifest import load_manifest, resolve
from tests.bench_support import RecordingGraph

SEQ_LSTM_FEATURES = 10


async def exchange(address: str) -> list[bytes]:
    """One of each RPC form on three seq_lstm sessions; the replies serialized, session ids
    replaced by s0, s1, s2 (they are random)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RnnServeStub(channel)
        opened = [await stub.OpenSession(pb.OpenSessionRequest(model="seq_lstm")) for _ in "abc"]
        ids = [o.session_id for o in opened]
        x = make_input(np.zeros((1, SEQ_LSTM_FEATURES)))  # (T=1, F)
        replies: list = [await stub.Step(pb.StepRequest(session_id=ids[0], step_index=7, input=x))]
        stream = stub.Session()
        for index in (0, 1):
            await stream.write(pb.StepRequest(session_id=ids[1], step_index=index, input=x))
            replies.append(await stream.read())
        await stream.done_writing()
        many = stub.StepMany()
        steps = [pb.StepRequest(session_id=i, step_index=3, input=x) for i in ids]
        await many.write(pb.StepManyRequest(steps=steps))
        replies.append(await many.read())
        block = pack_steps("seq_lstm", ids, np.zeros((3, 1, SEQ_LSTM_FEATURES)), [4, 4, 4])
        await many.write(pb.StepManyRequest(packed=block))
        replies.append(await many.read())
        await many.done_writing()
        replies += await asyncio.gather(
            *(stub.Step(pb.StepRequest(session_id=i, step_index=9, input=x)) for i in ids)
        )
    return [renamed(r, ids).SerializeToString() for r in replies]


def renamed(reply, ids: list[str]):
    names = {i: f"s{n}" for n, i in enumerate(ids)}
    if isinstance(reply, pb.StepResponse):
        reply.session_id = names[reply.session_id]
    else:
        for r in reply.results:
            r.session_id = r.reply.session_id = names[r.session_id]
    return reply


async def serve_and_exchange(servicer: echo_server.EchoServicer) -> list[bytes]:
    server, port = echo_server.create_server(servicer, "127.0.0.1:0")
    await server.start()
    try:
        return await exchange(f"127.0.0.1:{port}")
    finally:
        await server.stop(0)


def test_echo_model_pays_one_call_per_turn_and_answers_exactly_as_the_echo(quick_store) -> None:
    plain = echo_server.servicer_for(quick_store)
    assert type(plain) is echo_server.EchoServicer  # no --model: the echo as it was
    flagged = echo_server.servicer_for(quick_store, ["seq_lstm"])
    assert isinstance(flagged, echo_server.EchoModelServicer) and list(flagged.batchers) == [
        "seq_lstm"
    ]
    graph = RecordingGraph(quick_store, "seq_lstm")
    paying = echo_server.EchoModelServicer(
        echo_server.load_models(quick_store), {"seq_lstm": echo_server.TurnBatcher(graph)}
    )
    echo = asyncio.run(serve_and_exchange(plain))
    assert asyncio.run(serve_and_exchange(paying)) == echo
    # unary, stream, stream, StepMany of 3, a packed block of 3, then 3 concurrent unary Steps
    assert graph.calls[:5] == [(1, 1), (1, 1), (1, 1), (3, 1), (3, 1)]
    assert sum(rows for rows, _ in graph.calls[5:]) == 3 and len(graph.calls) <= 8
    # and the echo's own replies are still the canned ones
    m = load_manifest(resolve(quick_store, "seq_lstm"))
    expected = echo_server.canned_reply(m)
    expected.session_id, expected.step_index = "s0", 7
    assert echo[0] == expected.SerializeToString()
    packed = pb.StepManyResponse.FromString(echo[4]).packed
    assert list(packed.step_indexes) == [4, 4, 4]
    assert len(packed.raw) == 4 * 3 * m.output.size
