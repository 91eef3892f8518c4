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


def window(cores: float, msgs_per_s: float, steps_per_message: int = 1) -> dict[str, float | None]:
    """One timed window as run_window records it (the fields the CPU cost is made of)."""
    rates = {"steps_per_s": msgs_per_s * steps_per_message, "msgs_per_s": msgs_per_s}
    return {**rates, "server_cpu_counted": cores, **report.cpu_per_message(cores, **rates)}


def test_cpu_per_message_is_cores_over_the_message_rate() -> None:
    assert report.cpu_per_message(0.5, msgs_per_s=5_000.0, steps_per_s=5_000.0) == {
        "server_us_per_msg": pytest.approx(100.0),  # 0.5 s of CPU per second / 5,000 messages
        "server_us_per_step": pytest.approx(100.0),
    }
    # StepMany: 500 messages of 64 steps a second; each message costs 1 ms, each step 1/64 of it
    many = report.cpu_per_message(0.5, msgs_per_s=500.0, steps_per_s=32_000.0)
    assert many["server_us_per_msg"] == pytest.approx(1_000.0)
    assert many["server_us_per_step"] == pytest.approx(15.625)
    assert report.cpu_per_message(0.3, msgs_per_s=0.0, steps_per_s=0.0) == {
        "server_us_per_msg": None,
        "server_us_per_step": None,
    }


def test_summarize_takes_medians_and_leaves_out_windows_without_messages() -> None:
    reps = [window(0.5, 5_000.0), window(0.2, 0.0), window(0.9, 3_000.0), window(0.6, 4_000.0)]
    medians = run.summarize(reps)
    assert medians["server_cpu_counted"] == pytest.approx(0.55)  # every window counts here
    assert medians["server_us_per_msg"] == pytest.approx(150.0)  # median of 100, 300, 150
    assert run.summarize([window(0.2, 0.0)])["server_us_per_msg"] is None


def cost_cell(path: str, sessions: int, real: list, echo: list, per_message: int = 1) -> dict:
    """A cell as run_cell builds it, from each server's windows."""
    return {
        "model": "seq_lstm",
        "path": path,
        "sessions": sessions,
        "per_message": per_message,
        "rnnserve": run.summarize(real),
        "echo": run.summarize(echo),
    }


def test_cpu_per_message_table() -> None:
    steps = 64
    cells = [
        # 0.5 cores at 5,000 msgs/s = 100 µs; the echo: 0.4 cores at 8,000 msgs/s = 50 µs
        cost_cell("unary", 1, [window(0.5, 5_000.0)], [window(0.4, 8_000.0)]),
        # 0.8 cores at 500 messages of 64 steps a second = 1,600 µs a message, 25 µs a step;
        # the echo: 0.5 cores at 1,000 messages = 500 µs a message, 7.8 µs a step
        cost_cell(
            "stepmany",
            64,
            [window(0.8, 500.0, steps), window(0.9, 0.0, steps)],
            [window(0.5, 1_000.0, steps)],
            per_message=steps,
        ),
        cost_cell("unary", 64, [window(0.7, 0.0)], [window(0.6, 9_000.0)]),  # nothing answered
        cell("stepmany", 1, 500.0, per_message=1),  # from a run before the column existed
    ]
    lines = report.cpu_per_message_table({"cells": cells}, "seq_lstm").splitlines()
    assert lines[0] == (
        "| sessions | unary Step: rnnserve / echo | ratio "
        "| StepMany: rnnserve / echo | ratio | per step: rnnserve / echo |"
    )
    assert lines[2:] == [
        "| 1 | 100 / 50.0 | 2.00 | — / — | — | — / — |",
        "| 64 | — / 66.7 | — | 1,600 / 500 | 3.20 | 25.0 / 7.8 |",
    ]


MACHINE_FIELDS = ("nproc", "cpu", "kernel", "python", "grpcio", "onnxruntime", "numpy")


def test_the_generated_section_explains_the_cpu_per_message_table() -> None:
    results = {
        "machine": dict.fromkeys(MACHINE_FIELDS, "x"),
        "settings": {"workers": 2, "warmup": 0.4, "duration": 1.0, "reps": 1, "per_message": 64},
        "command": "python -m bench.run",
        "seconds": 1,
        "load_before": [0.0],
        "load_after": [0.0],
        "cells": [cost_cell("unary", 1, [window(0.5, 5_000.0)], [window(0.4, 8_000.0)])],
    }
    for side in ("rnnserve", "echo"):
        results["cells"][0][side] |= {"p50_us": 1.0, "p99_us": 2.0, "mean_batch": 1.0}
        results["cells"][0][side] |= {"server_cpu": 0.5, "client_cpu": 0.5, "steal": 0.1}
    section = report.generated_section(results)
    heading = "### seq_lstm: server CPU per message (µs): rnnserve / echo / ratio\n\n"
    assert heading + report.cpu_per_message_table(results, "seq_lstm") in section
    assert report.CPU_PER_MESSAGE_NOTE in section
    assert "twice the echo's CPU per message" in report.CPU_PER_MESSAGE_NOTE
