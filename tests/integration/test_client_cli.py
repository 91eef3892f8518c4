"""``rnnserve client`` against a real server: output for people (no empty fields, integers as
integers, ISO 8601 times, the manifest shown), and nothing printed before an error."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from grpc_support import server_config

from serving.cli import main
from serving.server import ServerThread


@pytest.fixture(scope="module")
def address(quick_store: Path) -> Iterator[str]:
    with ServerThread(server_config(quick_store)) as server:
        yield server.address


def client(address: str, capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["client", "--address", address, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_step_output_leaves_out_empty_fields_and_reads_as_numbers_and_times(address, capsys):
    code, out, _ = client(address, capsys, "step", "--model", "sum_sign_lstm", "--values", "3,3")
    assert code == 0
    first, second = json_objects(out)
    assert first["step_index"] == 0 and second["step_index"] == 1  # integers, not "0"
    assert "text" not in first  # "" for a classifier: left out
    (output,) = second["outputs"]
    assert set(output) == {
        "raw",
        "label",
        "index",
        "labels",
        "probabilities",
    }  # no value/char/top_k
    assert output["labels"] == ["negative", "positive"] and output["label"] == "positive"
    assert len(output["probabilities"]) == 2
    expires = datetime.fromisoformat(second["expires_at"])
    assert expires.utcoffset() is not None and expires.year >= 2024


def json_objects(text: str) -> list[dict]:
    """The JSON objects printed one after another."""
    decoder, objects, i = json.JSONDecoder(), [], 0
    while i < len(text.strip()):
        obj, i = decoder.raw_decode(text, i)
        objects.append(obj)
        while i < len(text) and text[i].isspace():
            i += 1
    return objects


def test_a_regression_output_has_values_and_no_index(address, capsys):
    code, out, _ = client(address, capsys, "predict", "--model", "sine", "--values", "0,0.156")
    (output,) = json.loads(out)["outputs"]
    assert code == 0 and set(output) == {"raw", "value"}


def test_model_shows_its_manifest(address, capsys):
    code, out, _ = client(address, capsys, "model", "sine")
    shown = json.loads(out)
    assert code == 0 and "manifest_json" not in shown
    assert shown["manifest"]["name"] == "sine" and shown["manifest"]["input"]["features"] == 1
    assert shown["version"] == 1 and shown["versions"] == [1]


def test_generate_prints_nothing_before_an_error(address, capsys):
    code, out, err = client(address, capsys, "generate", "--model", "sine", "--prompt", "x")
    assert (code, out) == (1, "")
    assert err.startswith("rnnserve client: INVALID_ARGUMENT: ")


def test_generate_prints_the_prompt_then_the_text(address, capsys):
    argv = ("generate", "--model", "char_hello", "--prompt", "hel", "--max-tokens", "2")
    code, out, _ = client(address, capsys, *argv, "--temperature", "0")
    assert code == 0 and out.startswith("hel") and len(out.rstrip("\n")) == 5


@pytest.mark.parametrize(
    ("values", "warns"),
    [
        ("0,0.156,0.309,0.454,0.588,0.707", False),  # sin(k dt), w = 1: what sine learnt
        ("0,0.84,0.91,0.14,-0.76", True),  # sin(k): w = 1 / dt ≈ 6.4, far past w_max
        ("0,0.31,0.59,0.81,0.95", False),  # w = 2, the edge of the range
        ("0,0.5,1.5", True),  # a value past sin's [-1, 1]
    ],
)
def test_forecast_warns_when_the_values_look_out_of_sines_range(address, capsys, values, warns):
    code, out, err = client(address, capsys, "forecast", "--model", "sine", "--values", values)
    assert code == 0 and len(json.loads(out)["forecast"]) == 50
    assert ("warning:" in err) == warns, err
    if "1.5" in values:
        assert "values outside [-1.0, 1.0], the range sine was trained on" in err
    elif warns:
        assert "w ≈ 6.3" in err and "trained on w in [0.5, 2.0]" in err
