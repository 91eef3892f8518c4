"""The core's session gate under a deep line of waiting calls, driven through the native core's
own binding with a small NumPy model whose batches the test holds and lets go."""

from __future__ import annotations

import threading
import time

import grpc

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.core import load_native

SPEC = {
    "name": "m", "version": 1, "input_kind": "features", "input_name": "x", "features": 1,
    "max_steps": 10, "output_kind": "regression", "output_size": 1, "activation": "none",
    "streamable": True, "states": [{"name": "h", "layers": 1, "size": 4, "init": 0.0}],
}  # fmt: skip
ENTRIES = 4096  # a StepMany message's most entries
STREAMS = 3  # 12,288 calls in line: recursing per answered call overflowed the stack at ~7,000


def test_thousands_of_calls_waiting_on_one_session_are_answered_in_order_without_a_crash():
    gate = threading.Event()

    def step(x, states):  # y = x + 1; holds the first batch until the line has formed
        gate.wait(30)
        return x + 1.0, [s.copy() for s in states]

    core = load_native().Core({"address": "127.0.0.1:0", "max_message_bytes": 64 << 20})
    core.add_model(SPEC, step)
    core.set_bridge(lambda method, request, identity: (12, "not here", b"", [], ""))
    port = core.start()
    big = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=big) as channel:
            stub = pb_grpc.RnnServeStub(channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="m")).session_id
            x = pb.Input(features=pb.Features(values=[0.5], steps=1))
            first = stub.Step.future(pb.StepRequest(session_id=sid, input=x))  # holds the gate
            time.sleep(0.3)
            wrong = pb.StepRequest(session_id=sid, input=x, step_index=10**9)
            replies: list[pb.StepManyResponse] = []

            def stream() -> None:
                replies.extend(stub.StepMany(iter([pb.StepManyRequest(steps=[wrong] * ENTRIES)])))

            threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
            for t in threads:
                t.start()
            time.sleep(2)  # every entry parsed and waiting on the gate
            gate.set()
            for t in threads:
                t.join(60)
            assert first.result(timeout=30).outputs[0].raw == [1.5]
            assert len(replies) == STREAMS
            for reply in replies:
                assert [r.error.expected_step_index for r in reply.results] == [1] * ENTRIES
            after = stub.Step(pb.StepRequest(session_id=sid, input=x, step_index=1))
            assert after.step_index == 1  # the session still steps
    finally:
        core.stop(1.0)
