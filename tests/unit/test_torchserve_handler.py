"""The TorchServe handler driven directly, without a server, through TorchServe's own Context.

Every zoo model answers batches of random-length requests exactly as the eager PyTorch reference
answers each request alone; char models generate and sine forecasts as an eager greedy rollout does;
each bad request gets its own 4xx and JSON error while the good ones sharing its batch are unharmed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from http_reference import (
    assert_matches,
    eager_alone,
    eager_rollout,
    random_body,
)
from ts.context import Context, RequestProcessor

from serving.manifest import load_manifest, resolve
from serving.torchserve.handler import RnnHandler
from training.reference import load_eager
from training.zoo import ZOO

MAX_BODY = 65536  # a small limit so the over-long-body case stays cheap


def torchserve_context(version_dir: Path, batch_size: int = 8) -> Context:
    config = {"batchSize": batch_size, "handler": {"max_body_bytes": MAX_BODY}}
    manifest = {"model": {"modelName": version_dir.parent.name}}
    return Context(
        version_dir.parent.name,
        str(version_dir),
        manifest,
        batch_size,
        None,
        "0.12.0",
        model_yaml_config=config,
    )


@pytest.fixture(scope="module")
def handlers(quick_store: Path) -> dict[str, tuple[RnnHandler, Context, Path]]:
    loaded = {}
    for name in ZOO:
        version_dir = resolve(quick_store, name)
        ctx = torchserve_context(version_dir)
        handler = RnnHandler()
        handler.initialize(ctx)
        loaded[name] = (handler, ctx, version_dir)
    return loaded


def run_batch(handler: RnnHandler, ctx: Context, bodies: list[Any]) -> list[tuple[int, dict]]:
    """One TorchServe batch: bodies arrive as raw bytes (decode_input_request=false)."""
    data = [{"body": b if isinstance(b, bytes) else json.dumps(b).encode()} for b in bodies]
    ctx.request_processor = [RequestProcessor({}) for _ in data]
    replies = handler.handle(data, ctx)
    assert len(replies) == len(bodies)
    return [(ctx.get_response_status(i)[0], json.loads(r)) for i, r in enumerate(replies)]


# ---- the independent reference ---------------------------------------------------------------


# ---- every model, mixed lengths -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_batch_of_mixed_lengths_equals_each_request_alone(handlers, name: str) -> None:
    handler, ctx, version_dir = handlers[name]
    m = load_manifest(version_dir)
    eager = load_eager(version_dir)
    rng = np.random.default_rng(len(name))
    bodies = [random_body(m, int(t), rng) for t in rng.integers(1, 40, size=7)]
    bodies.append(random_body(m, 1, rng))  # the shortest sequence shares a batch with long ones
    for (status, reply), body in zip(run_batch(handler, ctx, bodies), bodies, strict=True):
        assert status == 200, reply
        assert_matches(m, reply, eager_alone(eager, m, body))


def test_a_batch_of_one_equals_the_same_request_in_a_full_batch(handlers) -> None:
    handler, ctx, version_dir = handlers["seq_gru"]
    m = load_manifest(version_dir)
    rng = np.random.default_rng(7)
    bodies = [random_body(m, int(t), rng) for t in (50, 3, 17, 1, 33)]
    together = run_batch(handler, ctx, bodies)
    alone = [run_batch(handler, ctx, [b])[0] for b in bodies]
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)


@pytest.mark.parametrize("name", ["char", "char_hello"])
def test_generate_follows_the_eager_greedy_rollout(handlers, name: str) -> None:
    handler, ctx, version_dir = handlers[name]
    m = load_manifest(version_dir)
    eager = load_eager(version_dir)
    vocab = m.input.vocab or []
    prompts = ["".join(vocab[i % len(vocab)] for i in range(k, k + n)) for k, n in ((0, 5), (3, 1))]
    bodies = [{"text": p, "generate": n} for p, n in zip(prompts, (12, 4), strict=True)]
    bodies.append({"text": prompts[0]})  # a plain request in the same batch
    replies = run_batch(handler, ctx, bodies)
    for (status, reply), body in zip(replies[:2], bodies[:2], strict=True):
        assert status == 200, reply
        ids = eager_rollout(eager, m, body, body["generate"])
        assert reply["generated"] == "".join(vocab[i] for i in ids)
        assert reply["char"] == reply["generated"][0]
    assert "generated" not in replies[2][1]
    assert_matches(m, replies[2][1], eager_alone(eager, m, bodies[2]))


def test_sine_forecasts_by_feeding_predictions_back(handlers) -> None:
    handler, ctx, version_dir = handlers["sine"]
    m = load_manifest(version_dir)
    eager = load_eager(version_dir)
    t = np.arange(30) * 0.157
    bodies = [
        {"inputs": np.sin(t[:20]).reshape(-1, 1).tolist(), "horizon": 25},
        {"inputs": np.sin(0.5 + t[:7]).reshape(-1, 1).tolist(), "horizon": 3},
        {"inputs": np.sin(t[:12]).reshape(-1, 1).tolist()},
    ]
    replies = run_batch(handler, ctx, bodies)
    for (status, reply), body in zip(replies[:2], bodies[:2], strict=True):
        assert status == 200, reply
        expected = eager_rollout(eager, m, body, body["horizon"])
        assert reply["forecast"] == pytest.approx(expected, abs=1e-3)
        assert reply["value"] == pytest.approx(reply["forecast"][0], abs=1e-6)
    assert "forecast" not in replies[2][1]
    assert_matches(m, replies[2][1], eager_alone(eager, m, bodies[2]))


# ---- bad input: that request alone fails -------------------------------------------------------

FEATURES_BAD: list[tuple[str, Any, int, str]] = [  # (case, body, status, words in the message)
    ("malformed JSON", b'{"inputs": [[0.5], [0.1]', 400, "not valid JSON"),
    ("not UTF-8", b"\xff\xfe{}", 400, "UTF-8"),
    ("not an object", [[0.5]], 400, "JSON object"),
    ("empty body", b"", 400, "no JSON body"),
    ("missing inputs", {"values": [[0.5]]}, 400, "unknown field"),
    ("missing inputs, nothing else", {}, 400, 'missing field "inputs"'),
    (
        "wrong feature count",
        {"inputs": [[0.5, 0.1]]},
        400,
        "1 feature per step: 2 values",
    ),
    ("NaN", b'{"inputs": [[0.5], [NaN]]}', 400, "NaN or Inf"),
    ("Infinity", b'{"inputs": [[Infinity]]}', 400, "NaN or Inf"),
    ("empty sequence", {"inputs": []}, 400, "empty input"),
    ("not numbers", {"inputs": [["a"]]}, 400, "must be numbers"),
    ("ragged steps", {"inputs": [[0.5], [0.1, 0.2]]}, 400, "each a list of 1 numbers"),
    ("over-long sequence", {"inputs": [[0.1]] * 1025}, 400, "accepts at most 1024"),
    ("over-long body", b'{"inputs": [' + b"[0.25]," * 10_000 + b"[0.5]]}", 413, "the limit is"),
    ("generate on a classifier", {"inputs": [[0.5]], "generate": 3}, 400, "character models"),
    ("nested too deeply", b"[" * 50_000, 400, "nested too deeply"),  # was a RecursionError
]


@pytest.mark.parametrize(
    ("case", "body", "status", "words"), FEATURES_BAD, ids=[c[0] for c in FEATURES_BAD]
)
def test_a_bad_request_fails_alone_and_its_batch_mates_are_answered(
    handlers, case: str, body: Any, status: int, words: str
) -> None:
    handler, ctx, version_dir = handlers["sum_sign_lstm"]
    m = load_manifest(version_dir)
    eager = load_eager(version_dir)
    good = [{"inputs": [[0.5], [-0.25], [0.75]]}, {"inputs": [[-0.5]] * 9}]
    replies = run_batch(handler, ctx, [good[0], body, good[1]])
    bad_status, error = replies[1]
    assert bad_status == status, case
    assert words in error["error"], error
    assert error["code"] in ("INVALID_INPUT", "PAYLOAD_TOO_LARGE") and error["status"] == status
    for (ok, reply), g in zip((replies[0], replies[2]), good, strict=True):
        assert ok == 200
        assert_matches(m, reply, eager_alone(eager, m, g))


OTHER_BAD: list[tuple[str, Any, str, str]] = [  # (model, body, field, words)
    ("char", {"text": "héllo \x00"}, "text", "outside char's vocabulary"),
    ("char", {"text": ""}, "inputs", "empty input"),
    ("char", {"text": 5}, "text", "must be a string"),
    ("char", {}, "text", 'missing field "text"'),
    ("char", {"inputs": [[0.5]]}, "inputs", "char takes text/tokens, not feature vectors"),
    ("char", {"text": "a", "generate": 0}, "generate", "integer in [1, "),
    ("char", {"text": "a", "generate": True}, "generate", "integer in [1, "),
    ("char", {"text": "a", "generate": 100000}, "generate", "integer in [1, "),
    ("char", {"tokens": [1, -1]}, "tokens", "outside the vocabulary"),
    ("char", {"tokens": [1.7]}, "tokens", "must be integers, got float64"),  # not token 1
    ("char", {"tokens": ["3"]}, "tokens", "must be integers"),
    ("char", {"tokens": [True]}, "tokens", "must be integers, got bool"),
    ("char", {"tokens": [10**30]}, "tokens", "must be integers, got object"),  # no OverflowError
    ("char", {"tokens": 3}, "tokens", "flat list of integers"),
    ("char", {"tokens": [[1, 2], [3, 4]]}, "tokens", "flat list of integers, got shape [2, 2]"),
    ("sine", {"inputs": [[10**400]]}, "inputs", "must be numbers"),  # no OverflowError
    ("sine", {"inputs": 5}, "inputs", "must have shape [T, 1]"),
    ("sine", {"inputs": [[0.1]], "horizon": "5"}, "horizon", "integer in [1, "),
    ("seq_lstm", {"inputs": [[0.1] * 9]}, "inputs", "per step: 9 values do not make 1 step of 10"),
    ("seq_bilstm", {"inputs": [[0.1] * 10], "horizon": 2}, "horizon", "forecasting models"),
    ("seq_lstm", {"text": "abc"}, "text", "seq_lstm takes feature vectors, not text/tokens"),
]


@pytest.mark.parametrize(
    ("name", "body", "field", "words"), OTHER_BAD, ids=[f"{c[0]}-{c[3]}" for c in OTHER_BAD]
)
def test_bad_requests_name_the_problem(handlers, name: str, body: Any, field: str, words: str):
    handler, ctx, version_dir = handlers[name]
    m = load_manifest(version_dir)
    good = random_body(m, 6, np.random.default_rng(0))
    (bad_status, error), (ok, reply) = run_batch(handler, ctx, [body, good])
    assert bad_status == 400
    assert words in error["error"] and error["field"] == field, error
    assert ok == 200
    assert_matches(m, reply, eager_alone(load_eager(version_dir), m, good))


# A field the model would not read is refused, never ignored. (model, body, field, the message)
FOREIGN: list[tuple[str, Any, str, str]] = [
    (
        "seq_lstm",
        {"inputs": [[0.1] * 10], "text": "abc"},
        "text",
        '"text" is for text/token models: seq_lstm takes feature vectors, not text/tokens; '
        "seq_lstm accepts inputs",
    ),
    (
        "sine",
        {"inputs": [[0.1]], "tokens": [1, 2]},
        "tokens",
        '"tokens" is for text/token models: sine takes feature vectors, not text/tokens; '
        "sine accepts inputs, horizon",
    ),
    (
        "char",
        {"text": "The ", "inputs": [[0.5]]},
        "inputs",
        '"inputs" is for feature models: char takes text/tokens, not feature vectors; '
        "char accepts text, tokens, generate, top_k",
    ),
    (
        "elman",
        {"inputs": [[0.1]], "top_k": 3},
        "top_k",
        '"top_k" is for character models, and elman is not one; elman accepts inputs',
    ),
    (
        "sine",
        {"inputs": [[0.1]], "generate": 3},
        "generate",
        '"generate" is for character models, and sine is not one; sine accepts inputs, horizon',
    ),
    (
        "char_hello",
        {"text": "he", "horizon": 3},
        "horizon",
        '"horizon" is for forecasting models (sine), and char_hello is not one; '
        "char_hello accepts text, tokens, generate, top_k",
    ),
    (
        "char_hello",
        {"text": "he", "tokens": [0, 1]},
        "tokens",
        'send "text" or "tokens", not both: char_hello reads one sequence per request',
    ),
    (  # gRPC Generate samples; HTTP generate is greedy, so a temperature must not pass unnoticed
        "char",
        {"text": "The ", "generate": 3, "temperature": 0.8},
        "temperature",
        "unknown field(s) 'temperature'; char accepts text, tokens, generate, top_k",
    ),
    (
        "sine",
        {"inputs": [[0.1]], "Horizon": 3},
        "Horizon",
        "unknown field(s) 'Horizon'; sine accepts inputs, horizon",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "field", "message"), FOREIGN, ids=[f"{c[0]}-{c[2]}" for c in FOREIGN]
)
def test_a_field_the_model_does_not_read_is_refused_alone(
    handlers, name: str, body: Any, field: str, message: str
) -> None:
    """Another kind's field used to be ignored: "text" beside "inputs" answered for the inputs."""
    handler, ctx, version_dir = handlers[name]
    m = load_manifest(version_dir)
    good = random_body(m, 9, np.random.default_rng(5))
    (good_status, together), (bad_status, error) = run_batch(handler, ctx, [good, body])
    assert (bad_status, error) == (
        400,
        {"error": message, "code": "INVALID_INPUT", "field": field, "status": 400},
    )
    assert good_status == 200
    assert_matches(m, together, eager_alone(load_eager(version_dir), m, good))
    # the refused request never reached the graph: its batch-mate ran exactly as it does alone
    assert together == run_batch(handler, ctx, [good])[0][1]


def test_a_batch_of_only_bad_requests_answers_each_with_its_own_error(handlers) -> None:
    handler, ctx, _ = handlers["seq_lstm"]
    replies = run_batch(handler, ctx, [b"nope", {"inputs": []}, {"inputs": [[1.0]]}])
    assert [s for s, _ in replies] == [400, 400, 400]
    assert [r["error"][:20] for _, r in replies] == [
        "request body is not ",
        "empty input: send at",
        "seq_lstm expects 10 ",
    ]


def test_an_unexpected_parsing_error_fails_its_request_alone(handlers) -> None:
    """Whatever escapes parsing (here: a decoded body with keys JSON cannot make, whose sorting
    raises TypeError) is a 500 for that request; its batch mates are still answered."""
    handler, ctx, version_dir = handlers["elman"]
    m = load_manifest(version_dir)
    good = {"inputs": [[0.1], [0.2]]}
    data = [{"body": json.dumps(good).encode()}, {"body": {1: 0, "zz": 0}}]
    ctx.request_processor = [RequestProcessor({}) for _ in data]
    replies = handler.handle(data, ctx)
    assert ctx.get_response_status(0)[0] == 200
    assert_matches(m, json.loads(replies[0]), eager_alone(load_eager(version_dir), m, good))
    error = json.loads(replies[1])
    assert ctx.get_response_status(1)[0] == 500 == error["status"]
    assert error["code"] == "INTERNAL"


def test_every_reply_says_how_large_its_batch_was(handlers) -> None:
    handler, ctx, _ = handlers["elman"]
    run_batch(handler, ctx, [{"inputs": [[0.1]]}, {"inputs": [[0.2]]}, b"{"])
    assert [ctx.get_response_headers(i)["x-rnnserve-batch-size"] for i in range(3)] == ["3"] * 3
    assert ctx.get_response_content_type(2) == "application/json"


def test_an_error_names_a_few_unknown_keys_and_counts_the_rest(handlers) -> None:
    """50,000 unknown keys once came back as a 489 kB error body: each key was echoed. (5,000
    here: the unit handler's body limit is 64 kB.)"""
    handler, ctx, _ = handlers["sine"]
    many = {f"k{i:05d}": 0 for i in range(5_000)}
    long_key = {"x" * 60_000: 0}
    (s1, many_error), (s2, long_error) = run_batch(handler, ctx, [many, long_key])
    assert (s1, s2) == (400, 400)
    assert many_error["error"] == (
        "unknown field(s) 'k00000', 'k00001', 'k00002', 'k00003', 'k00004' and 4995 more; "
        "sine accepts inputs, horizon"
    )
    assert many_error["field"] == "k00000"
    assert len(json.dumps(long_error)) < 300 and long_error["field"] == "x" * 39 + "\u2026"
