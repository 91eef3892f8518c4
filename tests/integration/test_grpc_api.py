"""rnnserve.v1 over a real grpc.aio server on 127.0.0.1: every RPC, every bad input, streams."""

from __future__ import annotations

import queue
import urllib.request

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status
from grpc_support import manifest, random_chunk, raw, server_config, to_input

from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving._proto.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from serving.server import ServerThread


@pytest.fixture(scope="module")
def server(quick_store):
    with ServerThread(server_config(quick_store)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.RnnServeStub(channel)


@pytest.fixture(scope="module")
def ref(quick_store):
    return Reference(quick_store)


def open_session(stub, model: str) -> str:
    return stub.OpenSession(pb.OpenSessionRequest(model=model)).session_id


def step(stub, sid: str, x: np.ndarray, index: int | None = None) -> pb.StepResponse:
    req = pb.StepRequest(session_id=sid, input=to_input(x))
    if index is not None:
        req.step_index = index
    return stub.Step(req)


# ---- models and outputs -------------------------------------------------------------------------


def test_list_and_get_models(stub):
    names = {m.name for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert {"sum_sign_lstm", "seq_bilstm", "sine", "char", "elman"} <= names
    bi = stub.GetModel(pb.GetModelRequest(name="seq_bilstm"))
    assert not bi.streamable and bi.versions == [1] and bi.manifest_json
    lstm = stub.GetModel(pb.GetModelRequest(name="sum_sign_lstm"))
    assert lstm.streamable and lstm.output.kind == "classification" and len(lstm.output.labels) == 2
    assert [s.name for s in lstm.state] == ["h", "c"]
    assert stub.GetModel(pb.GetModelRequest(name="char")).input.vocab


def expected_probabilities(activation: str, y: np.ndarray) -> np.ndarray:
    """(T, O) head outputs → (T, K) probabilities, written out here (not the codec's)."""
    y = y.astype(np.float64)
    if activation == "sigmoid":
        positive = 1 / (1 + np.exp(-y[:, :1]))
        return np.concatenate([1 - positive, positive], axis=1)
    if activation == "log_softmax":
        return np.exp(y)
    z = np.exp(y - y.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# 3 steps: a reply of few rows (plain Python); 6 steps: more rows (NumPy); the same numbers
@pytest.mark.parametrize("steps", [3, 6])
@pytest.mark.parametrize("model", ["sum_sign_lstm", "seq_lstm", "elman", "sine", "char"])
def test_step_answers_in_the_models_terms(stub, quick_store, ref, model, steps):
    m = manifest(quick_store, model)
    x = random_chunk(m, np.random.default_rng(steps), steps)
    reply = step(stub, open_session(stub, model), x, 0)
    y = ref.run(model, [x])  # (T, O), the eager run
    np.testing.assert_allclose(raw(reply), y, atol=TOL)
    if m.output.kind == "regression":
        np.testing.assert_allclose([list(o.value) for o in reply.outputs], y, atol=TOL)
        return
    p = expected_probabilities(m.output.activation, y)  # (T, K)
    best = p.argmax(axis=1)
    labels = m.output.labels or m.output.vocab
    assert [o.index for o in reply.outputs] == best.tolist()
    if m.output.kind == "classification":
        assert [o.label for o in reply.outputs] == [labels[i] for i in best]
        got = np.array([list(o.probabilities) for o in reply.outputs])
        np.testing.assert_allclose(got, p, atol=1e-5)
        return
    assert reply.text == "".join(labels[i] for i in best)
    for out, row in zip(reply.outputs, p, strict=True):
        assert out.char == labels[int(row.argmax())] and len(out.top_k) == 5
        assert [c.index for c in out.top_k] == np.argsort(-row, kind="stable")[:5].tolist()
        assert [c.char for c in out.top_k] == [labels[c.index] for c in out.top_k]
        np.testing.assert_allclose([c.p for c in out.top_k], row[[c.index for c in out.top_k]],
                                   atol=1e-5)  # fmt: skip


def test_text_in_text_out_for_char_models(stub, quick_store, ref):
    m = manifest(quick_store, "char")
    text = "".join(m.input.vocab[i] for i in (3, 1, 4, 1, 5))
    reply = stub.Step(
        pb.StepRequest(session_id=open_session(stub, "char"), input=pb.Input(text=text))
    )
    np.testing.assert_allclose(raw(reply), ref.run("char", [np.array([3, 1, 4, 1, 5])]), atol=TOL)


def test_predict_whole_sequences_of_variable_length_bidirectional_too(stub, quick_store, ref):
    rng = np.random.default_rng(1)
    rows = [random_chunk(manifest(quick_store, "seq_bilstm"), rng, n) for n in (4, 1, 9)]
    reply = stub.Predict(pb.PredictRequest(model="seq_bilstm", inputs=[to_input(r) for r in rows]))
    got = np.array([list(o.raw) for o in reply.outputs])
    np.testing.assert_allclose(got, ref.sequence("seq_bilstm", rows), atol=TOL)


def test_reset_session_starts_over(stub, ref):
    sid = open_session(stub, "sum_sign_lstm")
    x = np.ones((2, 1), np.float32)
    step(stub, sid, x, 0)
    info = stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
    assert info.next_step_index == 0
    np.testing.assert_allclose(raw(step(stub, sid, x, 0)), ref.run("sum_sign_lstm", [x]), atol=TOL)


# ---- streams -------------------------------------------------------------------------------------


def test_session_stream_half_close_still_gets_every_reply_in_order(stub, quick_store, ref):
    sid = open_session(stub, "seq_gru")
    rng = np.random.default_rng(2)
    xs = [random_chunk(manifest(quick_store, "seq_gru"), rng, 1) for _ in range(30)]
    requests = [
        pb.StepRequest(session_id=sid, step_index=i, input=to_input(x)) for i, x in enumerate(xs)
    ]
    replies = list(stub.Session(iter(requests)))  # the iterator ends at once: half-close
    assert [r.step_index for r in replies] == list(range(30))
    np.testing.assert_allclose(
        np.concatenate([raw(r) for r in replies]), ref.run("seq_gru", xs), atol=TOL
    )


def test_cancel_mid_stream_leaves_the_session_usable(stub, ref):
    sid = open_session(stub, "sum_sign_lstm")
    xs = [np.full((1, 1), v, np.float32) for v in (0.3, -0.7, 0.2, 0.9, -0.1)]
    outbox: queue.Queue = queue.Queue()
    call = stub.Session(iter(outbox.get, None))
    got = []
    for i in range(3):
        outbox.put(pb.StepRequest(session_id=sid, step_index=i, input=to_input(xs[i])))
        if i < 2:
            got.append(raw(next(call)))
    call.cancel()  # step 2 may or may not have run
    with pytest.raises(grpc.RpcError) as err:
        next(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    got += [raw(step(stub, sid, xs[i], i)) for i in (2, 3, 4)]  # 2: ran → cached, else runs now
    np.testing.assert_allclose(np.concatenate(got), ref.run("sum_sign_lstm", xs), atol=TOL)


def test_step_many_carries_many_sessions_and_isolates_a_bad_one(stub, ref):
    sids = [open_session(stub, "elman") for _ in range(5)]
    rng = np.random.default_rng(3)
    xs = {s: [rng.normal(size=(2, 1)).astype(np.float32) for _ in range(3)] for s in sids}
    outs = {s: [] for s in sids}

    def messages():
        for k in range(3):
            entries = [
                pb.StepRequest(session_id=s, step_index=k, input=to_input(xs[s][k])) for s in sids
            ]
            entries.insert(2, pb.StepRequest(session_id="nope", input=to_input(xs[sids[0]][k])))
            entries.append(
                pb.StepRequest(session_id=sids[1], step_index=9, input=to_input(xs[sids[1]][k]))
            )
            yield pb.StepManyRequest(steps=entries)

    for reply in stub.StepMany(messages()):
        assert [r.session_id for r in reply.results][2] == "nope"
        bad, gap = reply.results[2], reply.results[-1]
        assert bad.error.code == "NOT_FOUND" and bad.error.reason == "SESSION_NOT_FOUND"
        assert gap.error.code == "FAILED_PRECONDITION" and gap.error.HasField("expected_step_index")
        for r in reply.results:
            if r.WhichOneof("result") == "reply":
                outs[r.session_id].append(raw(r.reply))
    for s in sids:
        np.testing.assert_allclose(np.concatenate(outs[s]), ref.run("elman", xs[s]), atol=TOL)


def test_generate_is_reproducible_and_alternates_with_steps(stub, quick_store, ref):
    m = manifest(quick_store, "char")
    prompt = "".join(m.input.vocab[i] for i in (5, 6, 7))

    def run():
        sid = open_session(stub, "char")
        first = step(stub, sid, np.array([5, 6, 7]), 0)
        req = pb.GenerateRequest(session_id=sid, max_tokens=10, temperature=0.8, top_k=4, seed=11)
        gen = list(stub.Generate(req))
        after = step(stub, sid, np.array([1]), gen[-1].step_index + 1)
        return first, gen, after

    (first, gen, after), (_, gen2, _) = run(), run()
    assert [g.text for g in gen] == [g.text for g in gen2] and len(gen) == 10
    assert [g.step_index for g in gen] == list(range(1, 11))
    tokens = np.array([g.token for g in gen])
    expected = ref.run("char", [np.array([5, 6, 7]), tokens, np.array([1])])
    got = np.concatenate([raw(first), np.array([list(g.output.raw) for g in gen]), raw(after)])
    np.testing.assert_allclose(got, expected, atol=TOL)
    assert prompt  # the same prompt as text works too:
    sid = open_session(stub, "char")
    req = pb.GenerateRequest(session_id=sid, prompt=pb.Input(text=prompt), max_tokens=10,
                             temperature=0.8, top_k=4, seed=11)  # fmt: skip
    assert [g.text for g in stub.Generate(req)] == [g.text for g in gen]


def next_index(stub, sid: str) -> int:
    """The session's next step_index, as the server states it (a far-off index is refused)."""
    with pytest.raises(grpc.RpcError) as refused:
        step(stub, sid, np.array([1]), 10**9)
    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(refused.value).details[0].Unpack(info)
    return int(info.metadata["expected_step_index"])


def test_generate_streams_each_token_as_made_and_stops_when_the_client_goes(stub, ref):
    """The first token arrives while the rest are still being made; cancelling the call stops
    the generation (the session has not consumed the 4,096 tokens asked for), and what was
    streamed before equals the offline run."""
    sid = open_session(stub, "char")
    first = step(stub, sid, np.array([5, 6, 7]), 0)
    call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=4096, temperature=0))
    got = [next(call) for _ in range(3)]
    call.cancel()
    settled = next_index(stub, sid)
    while (now := next_index(stub, sid)) != settled:  # a step in flight at the cancel lands
        settled = now
    assert 4 <= settled < 1 + 4096, settled
    expected = ref.run("char", [np.array([5, 6, 7]), np.array([g.token for g in got])])
    streamed = np.array([list(g.output.raw) for g in got])
    np.testing.assert_allclose(np.concatenate([raw(first), streamed]), expected, atol=TOL)


# ---- bad input: status + message, server up, nobody else touched ---------------------------------

BIG = 5 * 1024 * 1024 // 4  # floats in a message over the 4 MiB limit


def bad_cases(stub):
    """(name, call, expected code, words the message must contain)."""
    lstm = open_session(stub, "sum_sign_lstm")
    char = open_session(stub, "char")
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    fp, big = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED

    def feats(*values, steps=0):
        return pb.Input(features=pb.Features(values=values, steps=steps))

    def st(sid, inp, **kw):
        return lambda: stub.Step(pb.StepRequest(session_id=sid, input=inp, **kw))

    def open_(model, version=0):
        return lambda: stub.OpenSession(pb.OpenSessionRequest(model=model, version=version))

    def generate(sid):
        return lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=3)))

    # the count is refused before any row is decoded (the first row is malformed)
    many = [pb.Input(), *[feats(1.0)] * 4096]
    predict_many = lambda: stub.Predict(pb.PredictRequest(model="sine", inputs=many))  # noqa: E731

    nan, inf = float("nan"), float("inf")
    return [
        ("unknown model", open_("nope"), nf, "unknown model"),
        ("unknown version", open_("sine", 9), nf, "no version 9"),
        ("unknown session", st("no-such-id", feats(1)), nf, "unknown session"),
        ("a 20 kB session id", st("x" * 20_000, feats(1)), nf, "unknown session"),
        ("a 20 kB model name", open_("m" * 20_000), nf, "unknown model"),
        ("wrong feature count", st(lstm, feats(1, 2, steps=1)), inv, "make 1 step of 1 feature"),
        ("wrong dtype: text to features", st(lstm, pb.Input(text="ab")), inv, "not text"),
        ("wrong dtype: features to char", st(char, feats(1)), inv, "not feature vectors"),
        ("NaN", st(lstm, feats(1, nan)), inv, "NaN or Inf"),
        ("Inf", st(lstm, feats(inf)), inv, "NaN or Inf"),
        ("token outside vocab", st(char, pb.Input(tokens=pb.Tokens(ids=[10**6]))), inv, "outside"),
        ("char outside vocab", st(char, pb.Input(text="\u2603")), inv, "outside"),
        ("empty input", st(lstm, pb.Input()), inv, "empty input"),
        ("empty features", st(lstm, feats()), inv, "empty input"),
        ("too many steps", st(lstm, feats(*[0.0] * 1025)), inv, "at most 1024"),
        ("over the size limit", st(lstm, feats(*[0.0] * BIG)), big, ""),
        ("bidirectional session", open_("seq_bilstm"), fp, "use Predict"),
        ("step gap", st(lstm, feats(1), step_index=7), fp, "expected 0"),
        ("predict empty", lambda: stub.Predict(pb.PredictRequest(model="sine")), inv, "at least"),
        ("predict too many", predict_many, inv, "at most 4096"),
        ("generate from a classifier", generate(lstm), inv, "classifier"),
    ]


def test_every_bad_input_gets_its_status_and_nobody_else_is_touched(stub, quick_store, ref):
    rng = np.random.default_rng(4)
    bystander = open_session(stub, "seq_lstm")
    xs = [random_chunk(manifest(quick_store, "seq_lstm"), rng, 2) for _ in range(22)]
    got = [raw(step(stub, bystander, xs[0], 0))]
    for k, (name, call, code, message) in enumerate(bad_cases(stub), start=1):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == code, name
        assert message in err.value.details(), (name, err.value.details())
        got.append(raw(step(stub, bystander, xs[k], k)))  # server up, bystander state intact
    np.testing.assert_allclose(np.concatenate(got), ref.run("seq_lstm", xs[: len(got)]), atol=TOL)


def test_errors_carry_a_rich_status(stub):
    sid = open_session(stub, "sine")
    with pytest.raises(grpc.RpcError) as err:
        step(stub, sid, np.zeros((1, 1), np.float32), 3)
    status = rpc_status.from_call(err.value)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert info.reason == "STEP_OUT_OF_ORDER" and info.metadata["expected_step_index"] == "0"
    with pytest.raises(grpc.RpcError) as err:
        stub.Step(pb.StepRequest(session_id=sid, input=pb.Input(text="x")))
    bad = error_details_pb2.BadRequest()
    rpc_status.from_call(err.value).details[1].Unpack(bad)
    assert bad.field_violations[0].field == "text"


# ---- health, reflection, metrics -----------------------------------------------------------------


def test_health_overall_per_service_and_per_model(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rnnserve.v1.RnnServe", "sine", "seq_bilstm"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no-such-model"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_our_service(server):
    with grpc.insecure_channel(server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert "rnnserve.v1.RnnServe" in services and "grpc.health.v1.Health" in services
        proto = db.FindFileContainingSymbol("rnnserve.v1.RnnServe")
        methods = {m.name for m in proto.service[0].method}
        assert {"Step", "Session", "StepMany", "Generate", "Predict"} <= methods


def test_metrics_endpoint_counts_requests_batches_and_sessions(server, stub):
    sid = open_session(stub, "sine")
    step(stub, sid, np.zeros((1, 1), np.float32), 0)
    with pytest.raises(grpc.RpcError):  # its own failed Step, whatever ran before
        step(stub, sid, np.full((1, 1), np.nan, np.float32), 1)
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    lines = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines['rnnserve_requests_total{code="OK",method="Step"}'] >= 1
    assert lines['rnnserve_requests_total{code="INVALID_ARGUMENT",method="Step"}'] >= 1
    assert lines['rnnserve_batch_size_count{model="sine"}'] >= 1
    assert lines['rnnserve_step_latency_seconds_count{model="sine"}'] >= 1
    assert lines['rnnserve_live_sessions{model="sine"}'] >= 1


# ---- the client library's own argument checks --------------------------------------------------


def test_client_refuses_arrays_it_would_have_to_guess_about():
    from serving.client import make_input, pack_steps

    assert make_input(np.zeros((3, 2), np.float32)).features.steps == 3  # (T, F): T given
    with pytest.raises(ValueError, match=r"\(T, F\) or flat"):
        make_input(np.zeros((2, 3, 1), np.float32))  # was sent as 6 steps
    with pytest.raises(ValueError, match="T>=1"):
        pack_steps("seq_lstm", ["a", "b"], np.zeros((2, 0, 10), np.float32))  # wire T=0 is 1
    with pytest.raises(ValueError, match="T>=1"):
        pack_steps("char", ["a"], np.zeros((1, 0), np.int64))
