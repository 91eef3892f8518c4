"""StepMany's packed form over a real server: blocks of many sessions as raw tensors equal the
offline eager run per session; bad entries fail alone (by position) and leave every other state
untouched; message-level mistakes end the stream with their status; retries answer from the cache;
the echo server answers a packed block with a reply of the real one's size."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from eager import TOL, Reference
from grpc_support import manifest, random_chunk, server_config

from serving import codec
from serving._proto.rnnserve.v1 import rnnserve_pb2 as pb
from serving.client import Client, PackedReply, pack_steps
from serving.server import ServerThread

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(quick_store):
    with ServerThread(server_config(quick_store, max_batch_size=8)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def ref(quick_store):
    return Reference(quick_store)


def open_sessions(client: Client, model: str, count: int) -> list[str]:
    return [client.session(model).id for _ in range(count)]


def block_of(m, rng: np.random.Generator, n: int, steps: int) -> np.ndarray:
    """Random inputs for n sessions: (N, T, F) float32 or (N, T) int64."""
    return np.stack([random_chunk(m, rng, steps) for _ in range(n)])


def send(client: Client, model: str, sids, x, indexes=None) -> PackedReply:
    return client.step_block(model, sids, x, step_indexes=indexes)


def check_terms(m, r: PackedReply, rows: list[int]) -> None:
    """The probabilities and index of answered rows are what codec.format_output says."""
    if m.output.kind == "regression":
        assert r.probabilities is None and r.index is None
        return
    for pos in rows:
        for t in range(r.y.shape[1]):
            want = codec.format_output(m, r.y[pos, t])
            assert r.index[pos, t] == want["index"]
            if m.output.kind == "classification":
                p = want["probabilities"]
                np.testing.assert_allclose(r.probabilities[pos, t], p, rtol=1e-5, atol=1e-7)
            else:
                top = want["top_k"][0]
                assert r.probabilities[pos, t, top["index"]] == pytest.approx(top["p"], rel=1e-5)
                assert r.probabilities[pos, t].sum() == pytest.approx(1.0, rel=1e-4)


# ---- answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["seq_lstm", "sine", "char"])
def test_blocks_equal_the_eager_run_per_session(client, quick_store, ref, model):
    m = manifest(quick_store, model)
    rng = np.random.default_rng(5)
    n = 5
    sids = open_sessions(client, model, n)
    sent = [block_of(m, rng, n, steps) for steps in (1, 3, 2)]  # T differs per message
    blocks = ((sids, x, [k] * n) for k, x in enumerate(sent))
    replies = list(client.step_blocks(model, blocks))
    for k, (x, r) in enumerate(zip(sent, replies, strict=True)):
        assert r.errors == {} and r.step_indexes.tolist() == [k] * n
        assert r.y.shape == (n, x.shape[1], m.output.size) and r.expires_at > time.time()
        check_terms(m, r, list(range(n)))
    for i in range(n):
        got = np.concatenate([r.y[i] for r in replies])
        np.testing.assert_allclose(got, ref.run(model, [x[i] for x in sent]), atol=TOL)


def test_without_step_indexes_each_block_is_the_next_step(client, quick_store, ref):
    m = manifest(quick_store, "sine")
    rng = np.random.default_rng(6)
    sids = open_sessions(client, "sine", 3)
    sent = [block_of(m, rng, 3, 1) for _ in range(2)]
    replies = [send(client, "sine", sids, x) for x in sent]
    assert [r.step_indexes.tolist() for r in replies] == [[0] * 3, [1] * 3]
    for i in range(3):
        got = np.concatenate([r.y[i] for r in replies])
        np.testing.assert_allclose(got, ref.run("sine", [x[i] for x in sent]), atol=TOL)
    empty = send(client, "sine", [], np.zeros((0, 1, 1), np.float32))
    assert empty.y.shape == (0, 1, 0) and empty.errors == {} and empty.expires_at == 0


def test_a_session_twice_in_a_block_steps_twice_in_order(client, quick_store, ref):
    m = manifest(quick_store, "seq_lstm")
    rng = np.random.default_rng(7)
    a, b = open_sessions(client, "seq_lstm", 2)
    x = block_of(m, rng, 3, 2)
    r = send(client, "seq_lstm", [a, b, a], x, [0, 0, 1])
    assert r.errors == {} and r.step_indexes.tolist() == [0, 0, 1]
    twice = r.y[[0, 2]].reshape(4, -1)  # a's two steps, in order
    np.testing.assert_allclose(twice, ref.run("seq_lstm", [x[0], x[2]]), atol=TOL)
    np.testing.assert_allclose(r.y[1], ref.run("seq_lstm", [x[1]]), atol=TOL)


def test_a_retry_answers_from_the_cache_without_advancing(client, quick_store, ref):
    m = manifest(quick_store, "seq_lstm")
    rng = np.random.default_rng(8)
    sids = open_sessions(client, "seq_lstm", 4)
    x0, x1 = block_of(m, rng, 4, 2), block_of(m, rng, 4, 2)
    first = send(client, "seq_lstm", sids, x0, [0] * 4)
    again = send(client, "seq_lstm", sids, x0, [0] * 4)
    for field in ("step_indexes", "y", "probabilities", "index"):
        np.testing.assert_array_equal(getattr(again, field), getattr(first, field))
    shorter = send(client, "seq_lstm", sids[:1], x0[:1, :1], [0])  # a retry with another T
    assert shorter.errors[0].reason == "INVALID_INPUT"
    assert "answered with 2 time steps" in shorter.errors[0].message
    nxt = send(client, "seq_lstm", sids, x1, [1] * 4)
    assert nxt.errors == {} and nxt.step_indexes.tolist() == [1] * 4
    for i in range(4):
        got = np.concatenate([first.y[i], nxt.y[i]])
        np.testing.assert_allclose(got, ref.run("seq_lstm", [x0[i], x1[i]]), atol=TOL)


# ---- bad entries --------------------------------------------------------------------------------


def entry_errors_counted(server, code: str) -> float:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    found = re.search(
        rf'rnnserve_requests_total{{code="{code}",method="StepMany.entry"}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


def test_each_bad_entry_fails_alone_and_touches_nobody(server, client, quick_store, ref):
    m = manifest(quick_store, "seq_lstm")
    rng = np.random.default_rng(9)
    good = open_sessions(client, "seq_lstm", 3)
    nan_sid, gap_sid = open_sessions(client, "seq_lstm", 2)
    sine_sid = client.session("sine").id
    sids = [good[0], "no-such-session", good[1], sine_sid, nan_sid, gap_sid, "oip:seq_lstm:1"]
    sids.append(good[2])
    x0 = block_of(m, rng, len(sids), 2)
    x0[4, 1, 3] = np.nan
    not_found_before = entry_errors_counted(server, "NOT_FOUND")
    r = send(client, "seq_lstm", sids, x0, [0, 0, 0, 0, 0, 7, 0, 0])
    assert sorted(r.errors) == [1, 3, 4, 5, 6]
    assert r.errors[1].reason == "SESSION_NOT_FOUND" and r.errors[1].code == "NOT_FOUND"
    assert r.errors[3].code == "INVALID_ARGUMENT"
    assert "belongs to model 'sine'" in r.errors[3].message
    assert r.errors[4].field == "packed.features" and "NaN or Inf" in r.errors[4].message
    assert r.errors[5].reason == "STEP_OUT_OF_ORDER" and r.errors[5].code == "FAILED_PRECONDITION"
    assert r.errors[5].HasField("expected_step_index") and r.errors[5].expected_step_index == 0
    assert r.errors[6].reason == "SESSION_NOT_FOUND"  # another transport's id is not ours
    assert entry_errors_counted(server, "NOT_FOUND") == not_found_before + 2
    failed = [1, 3, 4, 5, 6]
    assert not r.y[failed].any() and not r.probabilities[failed].any()
    assert r.step_indexes[failed].tolist() == [0] * 5
    check_terms(m, r, [0, 2, 7])
    # every state is untouched but the three good ones: the next block equals the eager run
    x1 = block_of(m, rng, 5, 1)
    r1 = send(client, "seq_lstm", [*good, nan_sid, gap_sid], x1, [1, 1, 1, 0, 0])
    assert r1.errors == {}
    for i, pos in enumerate((0, 2, 7)):
        got = np.concatenate([r.y[pos], r1.y[i]])
        np.testing.assert_allclose(got, ref.run("seq_lstm", [x0[pos], x1[i]]), atol=TOL)
    for i in (3, 4):
        np.testing.assert_allclose(r1.y[i], ref.run("seq_lstm", [x1[i]]), atol=TOL)
    x_sine = np.zeros((1, 1, 1), np.float32)
    np.testing.assert_allclose(
        send(client, "sine", [sine_sid], x_sine, [0]).y[0], ref.run("sine", [x_sine[0]]), atol=TOL
    )


def test_a_token_outside_the_vocabulary_fails_its_entry_alone(client, quick_store, ref):
    m = manifest(quick_store, "char")
    rng = np.random.default_rng(10)
    sids = open_sessions(client, "char", 3)
    x0 = block_of(m, rng, 3, 2)
    x0[1, 1] = len(m.input.vocab)
    r = send(client, "char", sids, x0, [0, 0, 0])
    assert list(r.errors) == [1] and "outside the vocabulary" in r.errors[1].message
    x1 = block_of(m, rng, 3, 1)
    r1 = send(client, "char", sids, x1, [1, 0, 1])
    assert r1.errors == {}
    np.testing.assert_allclose(r1.y[1], ref.run("char", [x1[1]]), atol=TOL)
    for i in (0, 2):
        got = np.concatenate([r.y[i], r1.y[i]])
        np.testing.assert_allclose(got, ref.run("char", [x0[i], x1[i]]), atol=TOL)


def test_an_expired_session_fails_its_entry_alone(quick_store, tmp_path, ref):
    (tmp_path / "sine").symlink_to(quick_store / "sine")  # a store of one model starts fast
    config = server_config(tmp_path, session_ttl_s=0.4)
    with ServerThread(config) as s, Client(s.address) as c:
        old = c.session("sine").id
        time.sleep(0.7)
        fresh = c.session("sine").id
        x = np.full((2, 1, 1), 0.25, np.float32)
        r = c.step_block("sine", [old, fresh], x, [0, 0])
        assert list(r.errors) == [0] and r.errors[0].reason == "SESSION_EXPIRED"
        np.testing.assert_allclose(r.y[1], ref.run("sine", [x[1]]), atol=TOL)


# ---- message-level errors -----------------------------------------------------------------------


def message_cases(client: Client) -> list[tuple[str, pb.StepManyRequest, grpc.StatusCode, str]]:
    lstm = client.session("seq_lstm").id
    x = np.zeros((1, 1, 10), np.float32)
    short = pack_steps("seq_lstm", [lstm], x)
    short.features = short.features[:-1]
    both = pb.StepManyRequest(packed=pack_steps("seq_lstm", [lstm], x))
    both.steps.add(session_id=lstm)
    many = ["x"] * 4097
    too_many = pack_steps("seq_lstm", many, np.zeros((4097, 1, 10), np.float32))
    long = pack_steps("seq_lstm", [lstm], np.zeros((1, 1025, 10), np.float32))
    tokens = pack_steps("seq_lstm", [lstm], np.zeros((1, 1), np.int64))
    indexes = pack_steps("seq_lstm", [lstm], x, [0, 1])
    bi = pack_steps("seq_bilstm", [lstm], x)
    inv, nf = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return [
        ("wrong byte length", pb.StepManyRequest(packed=short), inv, "40 bytes"),
        ("steps and packed", both, inv, "not both"),
        ("too many entries", pb.StepManyRequest(packed=too_many), inv, "at most 4096"),
        ("too many time steps", pb.StepManyRequest(packed=long), inv, "at most 1024"),
        ("tokens to a features model", pb.StepManyRequest(packed=tokens), inv, "not tokens"),
        ("step_indexes of another length", pb.StepManyRequest(packed=indexes), inv, "2 step"),
        ("unknown model", pb.StepManyRequest(packed=pb.PackedSteps(model="nope")), nf, "unknown"),
        ("bidirectional", pb.StepManyRequest(packed=bi), grpc.StatusCode.FAILED_PRECONDITION,
         "use Predict"),
    ]  # fmt: skip


def test_message_level_errors_end_the_stream_and_the_server_stays_up(client, quick_store, ref):
    bystander = client.session("sine").id
    for k, (name, message, code, words) in enumerate(message_cases(client)):
        with pytest.raises(grpc.RpcError) as err:
            next(client.stub.StepMany(iter([message]), timeout=30))
        assert err.value.code() == code, name
        assert words in err.value.details(), (name, err.value.details())
        x = np.full((1, 1, 1), 0.1 * k, np.float32)
        assert send(client, "sine", [bystander], x, [k]).errors == {}, name


# ---- the client and the echo server -------------------------------------------------------------


def test_pack_steps_lays_out_row_major_little_endian():
    x = np.arange(12, dtype=np.float32).reshape(2, 3, 2)  # (N, T, F)
    block = pack_steps("m", ["a", "b"], x, np.array([4, 5]))
    assert block.steps == 3 and list(block.step_indexes) == [4, 5]
    np.testing.assert_array_equal(np.frombuffer(block.features, "<f4"), np.arange(12))
    tokens = pack_steps("m", ["a", "b"], np.array([[1, 2], [3, 4]]))
    assert list(tokens.tokens) == [1, 2, 3, 4] and not tokens.features and not tokens.step_indexes
    with pytest.raises(ValueError, match="shaped"):
        pack_steps("m", ["a"], x)
    empty = PackedReply.from_message(pb.PackedResults(), 0, 1)
    assert empty.y.shape == (0, 1, 0) and empty.errors == {}


def test_the_echo_server_answers_packed_blocks_with_the_real_sizes(client, quick_store):
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.echo_server", "--store", str(quick_store)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().split("listening on ")[1].strip()
        with Client(address) as echo:
            for model in ("seq_lstm", "sine", "char"):
                m = manifest(quick_store, model)
                x = block_of(m, np.random.default_rng(11), 3, 2)
                indexes = [4, 0, 9]
                real = send(client, model, open_sessions(client, model, 3), x, [0, 0, 0])
                canned = send(echo, model, open_sessions(echo, model, 3), x, indexes)
                assert canned.step_indexes.tolist() == indexes and canned.errors == {}
                assert canned.y.shape == real.y.shape
                if real.probabilities is None:
                    assert canned.probabilities is None
                else:
                    assert canned.probabilities.shape == real.probabilities.shape
                    assert canned.index.shape == real.index.shape
    finally:
        proc.terminate()
        proc.wait(10)
