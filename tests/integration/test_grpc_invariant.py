"""The invariant: under any interleaving of many sessions, over unary Step, Session streams and
StepMany at once, every session's outputs equal the offline eager run of its inputs (≤ 1e-5)."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from eager import TOL, Reference
from grpc_support import batch_totals, manifest, random_chunk, raw, server_config, to_input

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerThread

SESSIONS = 1050
CHUNKS = 5


def streamable(store) -> list[str]:
    names = sorted(p.parent.parent.name for p in store.glob("*/1/manifest.json"))
    return [n for n in names if manifest(store, n).streamable]


def test_hundreds_of_sessions_mixed_transports_match_the_offline_run(quick_store):
    rng = np.random.default_rng(0)
    models = streamable(quick_store)
    assert len(models) >= 8
    with (
        ServerThread(server_config(quick_store)) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.RnnServeStub(channel)
        plan = {}
        for i in range(SESSIONS):
            model = models[i % len(models)]
            sid = stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id
            m = manifest(quick_store, model)
            chunks = [random_chunk(m, rng, int(rng.integers(1, 4))) for _ in range(CHUNKS)]
            plan[sid] = (model, ("unary", "stream", "many")[i % 3], chunks)
        outs: dict[str, list[np.ndarray]] = {sid: [] for sid in plan}

        def unary(sid: str) -> None:
            for k, x in enumerate(plan[sid][2]):
                time.sleep(random.random() * 0.002)
                reply = stub.Step(pb.StepRequest(session_id=sid, step_index=k, input=to_input(x)))
                outs[sid].append(raw(reply))

        def stream(sid: str) -> None:
            requests = (
                pb.StepRequest(session_id=sid, step_index=k, input=to_input(x))
                for k, x in enumerate(plan[sid][2])
            )
            outs[sid].extend(raw(r) for r in stub.Session(requests))

        def step_many(sids: list[str]) -> None:
            sent = dict.fromkeys(sids, 0)
            lock = threading.Lock()

            def messages():
                while sent:
                    with lock:
                        pick = random.sample(sorted(sent), k=max(1, len(sent) // 2))
                    entries = []
                    for sid in pick:
                        k = sent[sid]
                        entries.append(pb.StepRequest(session_id=sid, step_index=k,
                                                      input=to_input(plan[sid][2][k])))  # fmt: skip
                        sent[sid] = k + 1
                        if sent[sid] == CHUNKS:
                            del sent[sid]
                    yield pb.StepManyRequest(steps=entries)

            for reply in stub.StepMany(messages()):
                for r in reply.results:
                    assert r.WhichOneof("result") == "reply", r.error.message
                    outs[r.session_id].append(raw(r.reply))

        by_mode = {
            mode: [s for s, p in plan.items() if p[1] == mode]
            for mode in ("unary", "stream", "many")
        }
        with ThreadPoolExecutor(24) as pool:
            jobs = [pool.submit(step_many, by_mode["many"])]
            jobs += [pool.submit(unary, s) for s in by_mode["unary"]]
            jobs += [pool.submit(stream, s) for s in by_mode["stream"]]
            for job in jobs:
                job.result()
        rows, batches = batch_totals(server.server.metrics_port)

    ref = Reference(quick_store)
    for sid, (model, mode, chunks) in plan.items():
        got = np.concatenate(outs[sid])
        np.testing.assert_allclose(got, ref.run(model, chunks), atol=TOL, err_msg=f"{model} {mode}")
    assert rows == SESSIONS * CHUNKS
    assert batches < rows, "StepMany's sessions should share backend calls"
