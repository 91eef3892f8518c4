"""StepMany over a real server: one message carrying several models, a session twice, a retry and
bad entries; every answered entry equals the offline eager run, in the model's own terms."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, raw, server_config, to_input

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerThread

MODELS = ("sum_sign_lstm", "sine", "char", "elman")


@pytest.fixture(scope="module")
def stub(quick_store):
    with (
        ServerThread(server_config(quick_store, max_batch_size=4)) as s,
        grpc.insecure_channel(s.address) as channel,
    ):
        yield pb_grpc.RnnServeStub(channel)


def entry(sid: str, x: np.ndarray, index: int) -> pb.StepRequest:
    return pb.StepRequest(session_id=sid, step_index=index, input=to_input(x))


def test_mixed_models_duplicates_retry_and_bad_entries(stub, quick_store):
    ref = Reference(quick_store)
    rng = np.random.default_rng(21)
    ms = {m: manifest(quick_store, m) for m in MODELS}
    sids = {m: stub.OpenSession(pb.OpenSessionRequest(model=m)).session_id for m in MODELS}
    sent: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    got: dict[str, list[pb.StepResponse]] = {m: [] for m in MODELS}
    for k in range(3):
        entries, owners = [], []
        if k:  # a retry of sine's last step, before its new one: the cached reply
            entries.append(entry(sids["sine"], sent["sine"][-1], k - 1))
            owners.append("retry")
        for m in MODELS:
            for j in (2 * k, 2 * k + 1) if m == "elman" else (k,):  # elman twice per message
                x = random_chunk(ms[m], rng, 1 + (j + k) % 3)
                entries.append(entry(sids[m], x, j))
                owners.append(m)
                sent[m].append(x)
        bad = pb.Input(features=pb.Features(values=[1.0, float("nan")], steps=2))
        entries.insert(2, pb.StepRequest(session_id=sids["sine"], input=bad))
        owners.insert(2, "nan")
        entries.append(entry("nope", sent["sine"][-1], 0))
        owners.append("unknown")
        reply = next(stub.StepMany(iter([pb.StepManyRequest(steps=entries)])))
        assert [r.session_id for r in reply.results] == [e.session_id for e in entries]
        for owner, r in zip(owners, reply.results, strict=True):
            if owner == "nan":
                assert r.error.reason == "INVALID_INPUT" and r.error.code == "INVALID_ARGUMENT"
            elif owner == "unknown":
                assert r.error.reason == "SESSION_NOT_FOUND"
            elif owner == "retry":
                assert without_deadline(r.reply) == without_deadline(got["sine"][-1])
            else:
                assert r.WhichOneof("result") == "reply", r.error
                got[owner].append(r.reply)
    assert [r.step_index for r in got["elman"]] == list(range(6))
    for m in MODELS:
        y = np.concatenate([raw(r) for r in got[m]])
        np.testing.assert_allclose(y, ref.run(m, sent[m]), atol=TOL)
        check_terms(ms[m], got[m])


def without_deadline(reply: pb.StepResponse) -> pb.StepResponse:
    copy = pb.StepResponse()
    copy.CopyFrom(reply)
    copy.ClearField("expires_at")  # pushed back by every call
    return copy


def check_terms(m, replies: list[pb.StepResponse]) -> None:
    """Each output in the model's own terms, as codec.format_output puts them."""
    for reply in replies:
        assert len(reply.outputs) >= 1 and reply.expires_at > 0
        for out in reply.outputs:
            y = np.asarray(out.raw, dtype=np.float32)
            want = codec.format_output(m, y)
            if m.output.kind == "regression":
                np.testing.assert_allclose(out.value, np.atleast_1d(want["value"]), rtol=1e-6)
            elif m.output.kind == "classification":
                assert out.label == want["label"] and out.index == want["index"]
                p = want["probabilities"]
                np.testing.assert_allclose(out.probabilities, p, rtol=1e-5, atol=1e-7)
            else:
                assert out.char == want["char"] and out.index == want["index"]
                assert [t.index for t in out.top_k] == [t["index"] for t in want["top_k"]]
                assert [t.char for t in out.top_k] == [t["char"] for t in want["top_k"]]
                np.testing.assert_allclose(
                    [t.p for t in out.top_k], [t["p"] for t in want["top_k"]], rtol=1e-5
                )
        if m.output.kind == "next_token":
            assert reply.text == "".join(o.char for o in reply.outputs)
