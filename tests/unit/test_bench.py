"""The gRPC bench's own logic, without servers: its flags, how it splits sessions over client
processes, where a window reads the server's CPU, echo+model's batching (on the real step graph),
the report's tables and targets (each a pure function of a results dict) and its plot."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import echo_server, report, run
from serving.server import SERVE_OPTIONS
from tests.bench_support import RecordingGraph


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


def test_echo_model_runs_by_default_for_the_models_benched() -> None:
    store = Path("store")
    commands = run.server_commands(store, run.echo_model_for(run.parse_args([])))
    assert list(commands) == ["echo", "echo+model", "rnnserve"]  # the order windows run in
    assert commands["echo+model"] == [*commands["echo"], "--model", "seq_lstm", "sine"]
    quick = run.parse_args(["--no-echo-model", "--models", "sine"])
    assert list(run.server_commands(store, run.echo_model_for(quick))) == ["echo", "rnnserve"]
    assert run.echo_model_for(run.parse_args(["--models", "sine"])) == ["sine"]


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


# ---- echo+model: the echo paying the step-graph call ------------------------------------------


def side(steps_per_s: float, msgs_per_s: float | None = None) -> dict[str, float]:
    return {"steps_per_s": steps_per_s, "msgs_per_s": msgs_per_s or steps_per_s}


def three_sides(path: str, n: int, real: float, echo: float, bound: float | None) -> dict:
    """A cell with rnnserve, echo and (unless ``bound`` is None) echo+model steps/s."""
    c = {"model": "seq_lstm", "path": path, "sessions": n, "per_message": 1}
    c |= {"rnnserve": side(real), "echo": side(echo)}
    if bound is not None:
        c[report.ECHO_MODEL] = side(bound)
    return c


def test_echo_model_table() -> None:
    cells = [
        three_sides("unary", 1, 300.0, 600.0, 450.0),  # the model call costs 1/4 of the echo
        three_sides("stream", 1, 400.0, 1_000.0, 800.0),
        three_sides("unary", 64, 2_000.0, 2_500.0, 2_500.0),
        three_sides("stream", 64, 4_000.0, 8_000.0, None),  # run without echo+model
    ]
    lines = report.echo_model_table({"cells": cells}, "seq_lstm").splitlines()
    assert lines[0] == (
        "| sessions | unary Step: echo+model steps/s | echo+model / echo | rnnserve / echo+model "
        "| bidi Session stream: echo+model steps/s | echo+model / echo | rnnserve / echo+model |"
    )
    assert lines[2:] == [
        "| 1 | 450 | 0.75 | 0.67 | 800 | 0.80 | 0.50 |",
        "| 64 | 2,500 | 1.00 | 0.80 | — | — | — |",
    ]


def test_bounds_are_echo_model_over_echo_at_64_and_only_where_it_ran() -> None:
    results = {
        "cells": [
            three_sides("stream", 64, 4_000.0, 8_000.0, 5_000.0),
            three_sides("unary", 64, 2_000.0, 2_500.0, None),
        ]
    }
    [bound] = report.echo_model_bounds(results)
    assert (bound["target"], bound["value"]) == ("bidi stream @64 vs echo", pytest.approx(0.625))
    text = report.targets_text(results).splitlines()
    assert text == [
        "MISSED seq_lstm: bidi stream @64 vs echo: 0.50 (≥ 0.75; 4,000 vs 8,000 msgs/s)",
        "       bound: echo+model reaches 0.62 of echo (5,000 vs 8,000 msgs/s)",
        "MET    seq_lstm: unary @64 vs echo: 0.80 (≥ 0.75; 2,000 vs 2,500 msgs/s)",
    ]
    plain = [{k: v for k, v in c.items() if k != report.ECHO_MODEL} for c in results["cells"]]
    assert report.targets(results) == report.targets({"cells": plain})  # not a target itself


def section_of(cells: list[dict]) -> str:
    for c in cells:
        for name in ("rnnserve", "echo", report.ECHO_MODEL):
            if name in c:
                c[name] |= {"p50_us": 1.0, "p99_us": 2.0, "mean_batch": 1.0, "server_cpu": 0.5}
    return report.generated_section(
        {
            "machine": dict.fromkeys(MACHINE_FIELDS, "x"),
            "settings": {"workers": 2, "warmup": 0.4, "duration": 1.0, "reps": 1, "per_message": 1},
            "command": "python -m bench.run",
            "seconds": 1,
            "load_before": [0.0],
            "load_after": [0.0],
            "cells": cells,
        }
    )


def test_the_section_shows_echo_model_only_for_a_run_that_has_it() -> None:
    with_it = [three_sides("stream", 64, 4_000.0, 8_000.0, 5_000.0)]
    section = section_of(with_it)
    heading = "### seq_lstm: echo+model: the transport floor with the model call\n\n"
    assert heading + report.echo_model_table({"cells": with_it}, "seq_lstm") in section
    assert report.ECHO_MODEL_NOTE in section and report.BOUNDS_NOTE in section
    assert "- seq_lstm: bidi stream @64 vs echo: bound: echo+model reaches 0.62 of echo" in section
    # without it (--no-echo-model, or an older run) the section is what it was before
    without = section_of([three_sides("stream", 64, 4_000.0, 8_000.0, None)])
    bounds = (
        f"{report.BOUNDS_NOTE}\n\n- seq_lstm: bidi stream @64 vs echo: bound: echo+model reaches "
        "0.62 of echo (5,000 vs 8,000 msgs/s)\n\n"
    )
    table = heading + report.echo_model_table({"cells": with_it}, "seq_lstm") + "\n\n"
    turns = ("(echo, echo+model and rnnserve take turns)", "(echo and rnnserve alternate)")
    assert turns[0] in section
    section = section.replace(bounds, "").replace(table + report.ECHO_MODEL_NOTE + "\n\n", "")
    assert section.replace(*turns) == without
    assert "echo+model" not in without


def test_rows_submitted_in_one_loop_turn_run_as_one_call(quick_store: Path) -> None:
    graph = RecordingGraph(quick_store, "seq_lstm")
    batcher = echo_server.TurnBatcher(graph)

    async def main() -> None:
        turn = [batcher.submit(1), batcher.submit(1), batcher.submit(64), batcher.submit(2, 3)]
        await asyncio.gather(*turn)
        await batcher.submit(5)  # a later turn: a call of its own

    asyncio.run(main())
    assert graph.calls == [(66, 1), (2, 3), (5, 1)]  # one T per call: T=3 runs right after
    assert (batcher.calls, batcher.rows) == (3, 73)
    RecordingGraph(quick_store, "char").run(3, 2)  # token ids: (B, T) int64


def test_a_turn_with_more_rows_than_rnnserve_batches_runs_in_capped_calls(quick_store) -> None:
    """1,000 sessions' rows in one turn: rnnserve's scheduler runs at most 256 per call, so
    echo+model must too (one call of 1,000 would be cheaper per row than anything we may run)."""
    graph = RecordingGraph(quick_store, "seq_lstm")
    batcher = echo_server.TurnBatcher(graph)
    assert batcher.max_rows == echo_server.MAX_BATCH_ROWS == 256

    async def main() -> None:  # 15 packed blocks of 64 and one of 40, all in one turn
        await asyncio.gather(*[batcher.submit(64) for _ in range(15)], batcher.submit(40))

    asyncio.run(main())
    assert graph.calls == [(256, 1), (256, 1), (256, 1), (232, 1)]


def test_capped_calls_split_items_in_order_and_answer_each_when_all_its_rows_ran(
    quick_store,
) -> None:
    graph = RecordingGraph(quick_store, "seq_lstm")
    batcher = echo_server.TurnBatcher(graph, max_rows=4)
    answered: list[tuple[int, int]] = []  # (item, calls run when it was answered)

    async def main() -> None:
        items = [batcher.submit(3), batcher.submit(3), batcher.submit(1, 2), batcher.submit(2)]
        for i, item in enumerate(items):
            item.add_done_callback(lambda _, i=i: answered.append((i, batcher.calls)))
        await asyncio.gather(*items)

    asyncio.run(main())
    # item 1 is split 1 + 2 rows; T=2 waits for the T=1 rows queued before and after it
    assert graph.calls == [(4, 1), (4, 1), (1, 2)]
    assert answered == [(0, 1), (1, 2), (3, 2), (2, 3)]


class FailingGraph(RecordingGraph):
    """The real graph, but its first call raises (as ORT would on a bad input)."""

    def run(self, rows: int, steps: int) -> None:
        super().run(rows, steps)
        if len(self.calls) == 1:
            raise RuntimeError("the call failed")


def test_a_failed_call_fails_its_items_and_drops_their_other_rows(quick_store) -> None:
    graph = FailingGraph(quick_store, "seq_lstm")
    batcher = echo_server.TurnBatcher(graph, max_rows=4)

    async def main() -> list:
        items = [batcher.submit(2), batcher.submit(5), batcher.submit(3)]
        return await asyncio.gather(*items, return_exceptions=True)

    first, split, after = asyncio.run(main())
    assert isinstance(first, RuntimeError) and isinstance(split, RuntimeError)
    assert after is None
    assert graph.calls == [(4, 1), (3, 1)]  # item 1's last 3 rows never ran


def test_rnnserve_is_benched_at_the_batch_cap_echo_model_uses() -> None:
    """Pinned on the command line, so $RNNSERVE_MAX_BATCH cannot set rnnserve's cap alone; and
    it is serve's own default, so the bench measures rnnserve as it ships."""
    argv = run.server_commands(Path("store"), ["sine"])["rnnserve"]
    assert argv[argv.index("--max-batch") + 1] == str(echo_server.MAX_BATCH_ROWS)
    [serve_default] = [o[3] for o in SERVE_OPTIONS if o[0] == "--max-batch"]
    assert serve_default == echo_server.MAX_BATCH_ROWS


# ---- the server CPU of a window: read where the messages are counted ---------------------------


class MeteredServer(run.Server):
    """A server whose CPU counter runs at 3 cores outside the counted window and 0.5 in it."""

    def __init__(self) -> None:
        super().__init__("echo", None, "127.0.0.1:1")  # type: ignore[arg-type]
        self.counted: tuple[float, float] | None = None  # wall clock, once the window is sent

    def cpu_seconds(self) -> float:
        if self.counted is None:
            return 0.0
        start, end = self.counted
        now = time.time()
        return 3.0 * now - 2.5 * (min(max(now, start), end) - start)


class WindowWorkers:
    """Client processes as run_window sees them: each answers its window with 100 messages of
    2 steps, once the window has ended (as bench.load does)."""

    def __init__(self, server: MeteredServer) -> None:
        self.server = server
        self.procs: list = []  # no client CPU to read

    def call(self, per_worker: list) -> list[dict[str, Any]]:
        [(_, command)] = per_worker
        w = command["window"]
        start = w["start_at"] + w["warmup"]
        self.server.counted = (start, start + w["duration"])
        time.sleep(max(0.0, start + w["duration"] - time.time()) + 0.05)
        return [{"steps": 200, "latencies": [0.001] * 100}]


def test_a_window_reads_the_server_cpu_at_the_counted_window_only() -> None:
    server = MeteredServer()
    args = SimpleNamespace(warmup=0.2, duration=0.3, per_message=64)
    window = run.run_window(WindowWorkers(server), server, "sine", "unary", [1], args)
    # around the whole window (warm-up, tail) it would be 3 cores, or ~1.1 with the warm-up alone
    assert window["server_cpu_counted"] == pytest.approx(0.5, abs=0.15)
    msgs_per_s = 100 / args.duration
    per_msg = window["server_cpu_counted"] / msgs_per_s * 1e6
    assert window["server_us_per_msg"] == pytest.approx(per_msg)
    assert window["server_us_per_step"] == pytest.approx(per_msg / 2)


def test_the_servers_stop_when_the_client_processes_cannot_start(monkeypatch) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = {"echo": run.Server("echo", sleeper, "127.0.0.1:1")}
        monkeypatch.setattr(run, "start_servers", lambda store, names: started)

        def cannot_spawn(count: int) -> None:
            raise OSError("cannot spawn a client process")

        monkeypatch.setattr(run, "Workers", cannot_spawn)
        with pytest.raises(OSError, match="cannot spawn"):
            run.measure_cells(Path("store"), run.parse_args([]))
        assert sleeper.poll() is not None  # stopped, not left serving
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


# ---- the plot -----------------------------------------------------------------------------------


def plotted(with_echo_model: bool) -> dict[str, Any]:
    """Two paths at 1 and 64 sessions; echo+model (if any) missing from the stream at 1."""
    cells = []
    for path in ("unary", "stream"):
        for n in (1, 64):
            bound = 500.0 * n if with_echo_model and (path, n) != ("stream", 1) else None
            cells.append(three_sides(path, n, 400.0 * n, 600.0 * n, bound))
    ceiling = [{"model": "seq_lstm", "batch": n, "steps_per_s": 9e3 * n} for n in (1, 64)]
    return {"cells": cells, "ceiling": ceiling}


def lines_of(fig) -> dict[str, Any]:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_the_plot_draws_echo_model_per_path_in_its_own_style(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = report.steps_figure(plotted(with_echo_model=True))
    lines = lines_of(fig)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    servers = ("rnnserve", "echo", "echo+model")
    assert set(lines) == {f"{s}, {p}" for s in servers for p in ("unary", "stream")} | {
        report.CEILING_LABEL
    }
    assert list(lines["echo+model, unary"].get_xdata()) == [1, 64]
    assert list(lines["echo+model, unary"].get_ydata()) == [500.0, 32_000.0]
    assert list(lines["echo+model, stream"].get_xdata()) == [64]  # where it ran
    styles = {s: lines[f"{s}, unary"].get_linestyle() for s in servers}
    assert len(set(styles.values())) == 3  # each server its own line style
    assert lines["echo+model, unary"].get_color() == lines["echo, unary"].get_color()
    assert legend == ["unary Step", "bidi Session stream", *servers, report.CEILING_LABEL]
    report.plot(plotted(with_echo_model=True), tmp_path / "with.png")
    assert (tmp_path / "with.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_of_a_run_without_echo_model_has_no_such_line(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = report.steps_figure(plotted(with_echo_model=False))
    lines = lines_of(fig)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert not any("echo+model" in label for label in [*lines, *legend])
    assert {"rnnserve, stream", "echo, stream"} <= set(lines)
    assert legend == ["unary Step", "bidi Session stream", "rnnserve", "echo", report.CEILING_LABEL]
    report.plot(plotted(with_echo_model=False), tmp_path / "without.png")
    assert (tmp_path / "without.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
