"""The gRPC bench's own logic, without servers: its flags, how it splits sessions over client
processes, and the report's targets (each a pure function of a results dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import report, run


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "0"], "argument --workers: must be >= 1, got 0"),
        (["--sessions", "16", "0"], "argument --sessions: must be >= 1, got 0"),
        (["--per-message", "-4"], "argument --per-message: must be >= 1, got -4"),
        (["--reps", "0"], "argument --reps: must be >= 1, got 0"),
        (["--idle-sessions", "0"], "argument --idle-sessions: must be >= 1, got 0"),
        (["--duration", "0"], "argument --duration: must be > 0.0, got 0"),
        (["--duration", "nan"], "argument --duration: must be > 0.0, got nan"),
        (["--warmup", "-1"], "argument --warmup: must be >= 0.0, got -1"),
        (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
        (["--models", "char"], "argument --models: invalid choice: 'char'"),
    ],
)
def test_bad_flags_stop_before_anything_runs(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        run.parse_args(flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_store_without_the_models_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "sine").mkdir()
    with pytest.raises(SystemExit):
        run.parse_args(["--store", str(tmp_path)])
    assert f"--store {tmp_path} has no seq_lstm" in capsys.readouterr().err
    assert run.parse_args(["--store", str(tmp_path), "--models", "sine"]).models == ["sine"]


def test_defaults_parse() -> None:
    args = run.parse_args([])
    assert (args.workers, args.reps, args.per_message) == (2, 3, 64)
    assert (args.warmup, args.duration) == (0.4, 1.0) and args.sessions == list(run.SESSIONS)


@pytest.mark.parametrize(
    ("n", "path", "workers", "counts"),
    [
        (16, "unary", 2, [8, 8]),
        (7, "stream", 2, [4, 3]),
        (64, "stepmany", 2, [64, 0]),  # one message of 64: never split across processes
        (1000, "packed", 2, [512, 488]),  # 16 messages (the last of 40), 8 per process
        (1, "unary", 1, [1]),
    ],
)
def test_split_sessions_keeps_messages_whole(
    n: int, path: str, workers: int, counts: list[int]
) -> None:
    assert run.split_sessions(n, path, 64, workers) == counts
    assert sum(counts) == n


def cell(path: str, sessions: int, steps_per_s: float, per_message: int = 64) -> dict[str, Any]:
    side = {"steps_per_s": steps_per_s, "msgs_per_s": steps_per_s / per_message}
    return {
        "model": "seq_lstm",
        "path": path,
        "sessions": sessions,
        "per_message": per_message,
        "rnnserve": side,
        "echo": side,
    }


def test_ceiling_targets_rate_only_messages_of_64() -> None:
    """The targets say "@64/msg": a run with --per-message 32 must not be rated under them."""
    ceiling = [{"model": "seq_lstm", "batch": 64, "steps_per_s": 100_000.0}]
    rated = {"cells": [cell("packed", 64, 60_000.0)], "ceiling": ceiling}
    [t] = report.targets(rated)
    assert t["target"] == report.CEILING_TARGETS[("packed", 64)]
    assert t["value"] == pytest.approx(0.6) and t["met"]
    other = {"cells": [cell("packed", 64, 60_000.0, per_message=32)], "ceiling": ceiling}
    assert report.targets(other) == []
