"""The gRPC bench's own logic, without servers: its flags, its plan of cells, how it reads a
server's CPU over a span, how it parses perf_analyzer's and load_client's reports, the report's
targets, tables and plot (each a pure function of a results dict), the crash check's summary, and
the Python echo+model's batching (on the real step graph)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench import crash, echo_server, native_tools, perf_analyzer, report, run
from tests.bench_support import RecordingGraph

# ---- flags and the plan -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--reps", "0"], "argument --reps: must be >= 1, got 0"),
        (["--concurrency", "16", "0"], "argument --concurrency: must be >= 1, got 0"),
        (["--per-message", "-4"], "argument --per-message: must be >= 1, got -4"),
        (["--duration", "0"], "argument --duration: must be > 0.0, got 0"),
        (["--duration", "nan"], "argument --duration: must be > 0.0, got nan"),
        (["--warmup", "-1"], "argument --warmup: must be >= 0.0, got -1"),
        (["--window-ms", "50"], "argument --window-ms: must be >= 100, got 50"),
        (["--servers", "triton"], "argument --servers: invalid choice: 'triton'"),
        (["--v1-paths", "stepmany"], "argument --v1-paths: invalid choice: 'stepmany'"),
    ],
)
def test_bad_flags_stop_before_anything_runs(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        run.parse_args(flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_store_without_seq_lstm_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--store", str(tmp_path)])
    assert f"--store {tmp_path} has no seq_lstm" in capsys.readouterr().err


def test_the_default_run_measures_every_cell_the_issue_asks_on_every_server() -> None:
    args = run.parse_args([])
    assert args.servers == ["native", "echo"] and args.reps == 3
    plan = run.cell_plan(args)
    for path in ("unary", "stream"):
        for n in (1, 16, 64, 256, 1000):
            assert ("oip", path, n) in plan and ("v1", path, n) in plan
    assert [c for c in plan if c[1] == "packed"] == [("v1", "packed", n) for n in (64, 256, 1000)]
    assert args.per_message == 64
    assert len(plan) == len(set(plan)) == 23


def test_quick_is_a_short_smoke_run() -> None:
    args = run.parse_args(["--quick"])
    assert (args.concurrency, args.packed_concurrency, args.reps) == ([1, 64], [64], 1)
    assert len(run.cell_plan(args)) == 9


def test_no_leftover_setting_reaches_a_server_but_the_core_build_to_measure(monkeypatch) -> None:
    monkeypatch.setenv("RNNSERVE_MAX_BATCH", "3")  # a leftover must not change what is benched
    monkeypatch.delenv("RNNSERVE_NATIVE_LIB", raising=False)
    assert not any(k.startswith("RNNSERVE_") for k in run.server_env("native"))
    monkeypatch.setenv("RNNSERVE_NATIVE_LIB", "/builds/_native.so")
    assert run.server_env("native")["RNNSERVE_NATIVE_LIB"] == "/builds/_native.so"
    assert "RNNSERVE_MAX_BATCH" not in run.server_env("native")
    assert not any(k.startswith("RNNSERVE_") for k in run.server_env("echo"))
    commands = run.server_commands(Path("store"), Path("echo_server"), Path("canned"))
    assert list(commands) == ["native", "echo"]
    assert commands["native"] == run.serve_command(Path("store"))
    assert commands["echo"] == ["echo_server", "--canned", "canned", "--address", "127.0.0.1:0"]


# ---- the server CPU over a span ---------------------------------------------------------------


def test_cores_between_interpolates_the_samples() -> None:
    samples = [(10.0, 1.0), (11.0, 1.5), (12.0, 3.5)]  # 0.5 cores, then 2 cores
    assert run.cores_between(samples, 10.0, 11.0) == pytest.approx(0.5)
    assert run.cores_between(samples, 11.5, 12.0) == pytest.approx(2.0)
    assert run.cores_between(samples, 10.5, 11.5) == pytest.approx((0.25 + 1.0) / 1.0)
    assert run.cores_between(samples, 9.0, 11.0) is None  # before the first sample
    assert run.cores_between(samples, 11.0, 12.5) is None  # after the last
    assert run.cores_between(samples[:1], 10.0, 10.0) is None


def test_cpu_per_step_is_cores_over_the_step_rate() -> None:
    assert run.per_step_us(0.5, 5_000.0) == pytest.approx(100.0)
    assert run.per_step_us(None, 5_000.0) is None
    assert run.per_step_us(0.5, 0.0) is None


def test_summarize_takes_medians_of_the_measurements_that_worked() -> None:
    reps = [
        {"steps_per_s": 100.0, "p50_us": 5.0, "server_us_per_step": 10.0},
        {"error": "perf_analyzer exited 99", "steps_per_s": 1.0},
        {"steps_per_s": 300.0, "p50_us": 7.0, "server_us_per_step": None},
        {"steps_per_s": 200.0, "p50_us": 9.0, "server_us_per_step": 30.0},
    ]
    side = run.summarize(reps)
    assert side["steps_per_s"] == 200.0 and side["p50_us"] == 7.0
    assert side["server_us_per_step"] == 20.0  # the window without a reading is left out
    assert side["errors"] == ["perf_analyzer exited 99"] and side["reps"] == reps
    assert run.summarize([{"error": "x"}])["steps_per_s"] is None


def test_a_tool_that_hangs_after_its_report_is_killed_and_its_report_kept(monkeypatch) -> None:
    monkeypatch.setattr(run, "AFTER_REPORT_S", 0.3)
    script = f"print('Throughput: 5 infer/sec'); print({run.REPORT_END!r}, flush=True); "
    hangs = run.run_until_reported([sys.executable, "-c", script + "import time; time.sleep(30)"],
                                   dict(os.environ), timeout=20)  # fmt: skip
    assert hangs.hung and not hangs.timed_out and hangs.returncode == 0
    assert "Throughput: 5 infer/sec" in hangs.output and hangs.reported_at is not None
    silent = run.run_until_reported([sys.executable, "-c", "import time; time.sleep(30)"],
                                    dict(os.environ), timeout=0.3)  # fmt: skip
    assert silent.timed_out and silent.reported_at is None
    started = time.monotonic()
    fails = run.run_until_reported([sys.executable, "-c", "print('error: no'); exit(3)"],
                                   dict(os.environ), timeout=20)  # fmt: skip
    assert (fails.returncode, fails.hung, fails.timed_out) == (3, False, False)
    assert time.monotonic() - started < 10  # an early exit is not waited out


# ---- the tools' reports -----------------------------------------------------------------------

PERF_ANALYZER_OUTPUT = """\
*** Measurement Settings ***
  Batch size: 1
  Service Kind: Triton
  Using "time_windows" mode for stabilization
Request concurrency: 16
  Client:
    Request count: 70124
    Sequence count: 1393 (381.443 seq/sec)
    Throughput: 19202 infer/sec
    p50 latency: 693 usec
    p90 latency: 1163 usec
    p99 latency: 2038 usec
    Avg gRPC time: 741 usec ((un)marshal request/response 1 usec + response wait 740 usec)
Inferences/Second vs. Client p99 Batch Latency
Concurrency: 16, throughput: 19202 infer/sec, latency 2038 usec
"""


def test_perf_analyzer_output_parses_into_the_numbers_the_bench_uses() -> None:
    r = perf_analyzer.parse(0, PERF_ANALYZER_OUTPUT)
    assert (r.request_count, r.sequence_count) == (70124, 1393)
    assert (r.throughput, r.p50_us, r.p99_us) == (19202.0, 693.0, 2038.0)
    assert r.ok and r.errors == []
    failed = perf_analyzer.parse(99, "error: failed to get model metadata: unknown model\n")
    assert not failed.ok and failed.errors == ["error: failed to get model metadata: unknown model"]
    assert run.first_error(failed).startswith("error: failed to get model metadata")


LOAD_CLIENT_OUTPUT = (
    '{"ready": 64}\n'
    '{"path": "packed", "sessions": 64, "per_message": 64, "seconds": 1, "steps": 497984, '
    '"messages": 7781, "steps_per_s": 497984, "msgs_per_s": 7781, "p50_us": 77.822, '
    '"p99_us": 668.592, "errors": 0, "first_error": "", "open_seconds": 0.0083}\n'
)


def test_load_client_output_parses_into_its_report() -> None:
    r = native_tools.parse_load(LOAD_CLIENT_OUTPUT)
    assert (r.path, r.sessions, r.per_message) == ("packed", 64, 64)
    assert (r.steps_per_s, r.msgs_per_s, r.p50_us, r.p99_us) == (497984.0, 7781.0, 77.822, 668.592)
    assert r.ok and isinstance(r.steps, int)


@pytest.mark.parametrize(
    ("output", "message"),
    [
        (
            '{"ready": 3}\n{"error": "the server stopped answering"}\n',
            "the server stopped answering",
        ),
        ('{"error": "OpenSession: gRPC 14: failed to connect"}\n', "OpenSession: gRPC 14"),
        ('{"ready": 3}\n', "stopped after opening its sessions"),
        ("Segmentation fault\n", "printed no report: 'Segmentation fault'"),
    ],
)
def test_a_load_client_that_failed_says_why(output: str, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        native_tools.parse_load(output)


def test_a_load_client_report_with_failed_steps_is_not_ok() -> None:
    report_line = json.loads(LOAD_CLIENT_OUTPUT.splitlines()[1])
    report_line.update(errors=2, first_error="Step answered index 3, sent 4")
    r = native_tools.parse_load(json.dumps(report_line))
    assert not r.ok and r.first_error == "Step answered index 3, sent 4"


def test_load_command_names_every_setting_and_refuses_an_unknown_path() -> None:
    argv = native_tools.load_command(Path("lc"), "127.0.0.1:1", "seq_lstm", 10, "stream", 256)
    assert argv[0] == "lc" and argv[argv.index("--sessions") + 1] == "256"
    assert argv[argv.index("--path") + 1] == "stream"
    assert argv[argv.index("--features") + 1] == "10"
    with pytest.raises(ValueError, match="path must be one of unary, stream, packed"):
        native_tools.load_command(Path("lc"), "127.0.0.1:1", "seq_lstm", 10, "stepmany", 64)


# ---- targets, tables, plot ---------------------------------------------------------------------


def side(steps: float, p50: float = 1000.0, cpu: float | None = None) -> dict[str, Any]:
    rates = {"steps_per_s": steps, "msgs_per_s": steps, "p50_us": p50, "p99_us": 2 * p50}
    return {**rates, "server_us_per_step": cpu, "server_cores": None, "errors": None, "reps": [{}]}


def cell(api: str, path: str, n: int, native, echo, per_message: int = 1) -> dict:
    return {"api": api, "path": path, "concurrency": n, "per_message": per_message,
            "native": native, "echo": echo}  # fmt: skip


def results_of(cells: list[dict], ceiling: float | None = 200_000.0) -> dict[str, Any]:
    rows = [{"model": "seq_lstm", "batch": 64, "us_per_call": 320.0, "steps_per_s": ceiling}]
    return {"cells": cells, "ceiling": rows if ceiling else []}


def by_target(results: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(t["api"], t["target"]): t for t in report.targets(results)}


def test_cpu_per_step_is_rated_against_the_echo_at_16_64_and_256() -> None:
    cells = [
        cell("oip", "unary", 16, side(9e3, cpu=50.0), side(2e4, cpu=25.0)),
        cell("oip", "stream", 64, side(9e3, cpu=40.0), side(2e4, cpu=16.0)),
        cell("oip", "stream", 1, side(2e3, cpu=300.0), side(8e3, cpu=78.0)),
    ]
    rated = by_target(results_of(cells))
    unary = rated["oip", "unary c=16: CPU per step vs echo"]
    assert unary["native"] == pytest.approx(2.0) and unary["met"]
    stream = rated["oip", "stream c=64: CPU per step vs echo"]
    assert stream["native"] == pytest.approx(2.5) and stream["met"]  # the goal itself is met
    assert not any("c=1:" in target for _, target in rated)  # c=1 is not one of them


def test_a_cpu_ratio_above_the_goal_is_missed() -> None:
    cells = [cell("v1", "unary", 256, side(9e3, cpu=60.0), side(2e4, cpu=20.0))]
    [t] = report.targets(results_of(cells, ceiling=None))
    assert t["native"] == pytest.approx(3.0) and not t["met"]


def test_the_lone_stream_target_is_the_p50_above_the_echo() -> None:
    cells = [
        cell("oip", "stream", 1, side(3e3, p50=240.0), side(9e3, p50=100.0)),
        cell("v1", "stream", 1, side(3e3, p50=260.0), side(9e3, p50=100.0)),
    ]
    rated = by_target(results_of(cells))
    oip = rated["oip", "lone stream (c=1): p50 − echo p50"]
    assert (oip["native"], oip["met"]) == (140.0, True)
    v1 = rated["v1", "lone stream (c=1): p50 − echo p50"]
    assert (v1["native"], v1["met"]) == (160.0, False)
    assert report.value_text(v1, "native") == "+160 µs"


def test_packed_is_rated_against_the_ceiling_only_at_64_a_message() -> None:
    name = ("v1", "StepMany packed, 64 a message, vs ORT ceiling at batch 64")
    cells = [cell("v1", "packed", 64, side(110e3), side(400e3), per_message=64)]
    t = by_target(results_of(cells, ceiling=200_000.0))[name]
    assert (t["native"], t["met"]) == (0.55, True)
    other = [cell("v1", "packed", 64, side(110e3), side(400e3), per_message=32)]
    assert name not in by_target(results_of(other))
    assert name not in by_target(results_of(cells, ceiling=None))


def test_throughput_at_1000_is_rated_against_64_per_api_and_path() -> None:
    cells = [
        cell("oip", "stream", 64, side(10e3), side(20e3)),
        cell("oip", "stream", 1000, side(8.5e3), side(20e3)),
        cell("v1", "unary", 64, side(10e3), side(20e3)),
        cell("v1", "unary", 1000, side(9e3), side(20e3)),
    ]
    rated = by_target(results_of(cells))
    stream = rated["oip", "stream: steps/s at 1,000 vs at 64"]
    assert stream["native"] == pytest.approx(0.85) and not stream["met"]
    unary = rated["v1", "unary: steps/s at 1,000 vs at 64"]
    assert unary["native"] == pytest.approx(0.9) and unary["met"]


def test_a_failed_native_measurement_rates_nothing_and_is_listed() -> None:
    broken = side(0.0)
    broken.update(steps_per_s=None, p50_us=None, errors=["the server exited"], reps=[{}, {}])
    cells = [cell("oip", "stream", 1, broken, side(9e3, p50=100.0))]
    results = results_of(cells)
    assert report.targets(results) == []
    assert report.error_lines(results) == [
        "- native core, oip stream c=1: 1 of 2 failed; first: `the server exited`"
    ]
    assert "| stream | 1 | failed | 9,000 |" in report.throughput_table(results, "oip")


def full_results() -> dict[str, Any]:
    cells = []
    for api in ("oip", "v1"):
        for path in ("unary", "stream"):
            for n in (1, 64, 1000):
                cells.append(cell(api, path, n, side(8e3 + n, cpu=40.0), side(2e4, cpu=20.0)))
    cells.append(cell("v1", "packed", 64, side(9e4), side(4e5), per_message=64))
    results = results_of(cells)
    results.update(
        machine={"nproc": 2, "cpu": "cpu", "kernel": "k", "python": "3.11", "grpcio": "1",
                 "libgrpc++": "1.51", "onnxruntime": "1.32"},
        settings={"reps": 3, "window_ms": 800, "per_message": 64, "warmup": 0.3, "duration": 1.0},
        command="python -m bench.run", seconds=600, load_before=[0.5], load_after=[1.5],
        steal=0.02, crashes={"native": [], "echo": []},
    )  # fmt: skip
    return results


def test_the_generated_section_has_the_run_the_targets_and_a_table_per_api(tmp_path) -> None:
    results = full_results()
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{report.BEGIN}\nold\n{report.END}\nafter\n")
    report.write_markdown(results, doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n\n" + report.BEGIN)
    assert text.endswith(report.END + "\nafter\n") and "old" not in text
    for title in ("### OIP (perf_analyzer): steps/s and latency",
                  "### rnnserve.v1 (C++ load_client): server CPU per step",
                  "### Targets (one run)", "### ORT ceiling"):  # fmt: skip
        assert title in text
    assert "| unary | 64 | 40.0 | 20.0 | 2.00 | — | 0 |" in text
    assert "- Server exits during the run: none." in text
    assert "Failed measurements" not in text


def test_the_plot_has_a_panel_per_api_and_a_line_per_server_and_path(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = report.steps_figure(full_results())
    titles = [ax.get_title() for ax in fig.axes]
    v1_lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
    cpu_lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert titles == [f"{report.API_TITLES[api]}: {label}" for label in ("steps/s",
                      "server CPU µs per step") for api in ("oip", "v1")]  # fmt: skip
    assert list(cpu_lines["echo, stream"].get_ydata()) == [20.0, 20.0, 20.0]
    assert report.CEILING_LABEL not in cpu_lines
    servers, paths = ("native", "echo"), ("unary", "stream", "packed")
    assert set(v1_lines) == {f"{s}, {p}" for s in servers for p in paths} | {report.CEILING_LABEL}
    assert list(v1_lines["native, unary"].get_xdata()) == [1, 64, 1000]
    assert list(v1_lines["native, unary"].get_ydata()) == [8001.0, 8064.0, 9000.0]
    assert v1_lines["native, unary"].get_linestyle() != v1_lines["echo, unary"].get_linestyle()
    assert legend == ["unary", "stream", "StepMany packed", "native core", "C++ echo",
                      report.CEILING_LABEL]  # fmt: skip
    report.plot(full_results(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the crash check --------------------------------------------------------------------------


def outcome(n: int, exit_code: int | None = None, hang: bool = False, errors=()) -> dict:
    return {"concurrency": n, "run": 1, "steps_per_s": 1000.0 * n, "errors": list(errors),
            "hang": hang, "seconds": 2.0, "server_exit": exit_code}  # fmt: skip


def test_the_crash_summary_counts_exits_hangs_and_errors_per_concurrency(tmp_path) -> None:
    rows = [outcome(64), outcome(64, exit_code=-11), outcome(256, hang=True),
            outcome(256, errors=["error: stream closed"]), outcome(256)]  # fmt: skip
    summary = crash.summarize(rows, [64, 256, 1000])
    assert [(s["runs"], s["crashes"], s["hangs"], s["runs_with_errors"]) for s in summary] == [
        (2, 1, 0, 0), (3, 0, 1, 1), (0, 0, 0, 0),
    ]  # fmt: skip
    assert "EXITED (-11)" in crash.crash_line(rows[1])
    results = {"runs": rows, "summary": summary, "command": "python -m bench.crash"}
    results.update(window_ms=500, seconds=9, finished_utc="t")
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"head\n{report.BEGIN}\ngrpc\n{report.END}\ntail\n")
    report.write_crash_markdown(results, doc)
    report.write_crash_markdown(results, doc)  # a second run replaces its own section
    text = doc.read_text()
    assert text.count(report.CRASH_BEGIN) == 1 and text.endswith("tail\n")
    assert "| 64 | 2 | **1** | 0 | 0 | 64,000 |" in text
    assert "- `error: stream closed`" in text


# ---- the Python echo+model's batching (bench/echo_server.py) ----------------------------------


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


# ---- the Redis store beside the memory store (bench.redis_store) ---------------------------------


def test_the_redis_bench_takes_the_median_of_each_rep_pairs_ratio_and_skips_failed_pairs() -> None:
    from bench import redis_store

    def rep(steps: float, error: str | None = None) -> dict[str, Any]:
        side = {"steps_per_s": steps, "p50_us": 100.0, "p99_us": 200.0, "server_us_per_step": 9.0}
        return {**side, "error": error} if error else side

    memory = [rep(1000), rep(2000), rep(4000), rep(1000)]
    redis = [rep(600), rep(800), rep(3000), rep(0, "load_client: it stopped")]
    cell = redis_store.summarize("stream", 64, {"memory": memory, "redis": redis})
    assert cell["ratios"] == [0.6, 0.4, 0.75]  # the failed pair left out
    assert cell["ratio"] == 0.6
    assert cell["memory"]["steps_per_s"] == 1500  # medians over each side's good reps
    assert cell["redis"]["steps_per_s"] == 800
    assert cell["redis"]["errors"] == ["load_client: it stopped"]
    assert "ratio 0.60 (goal ≥ 0.6: met" in redis_store.cell_line(cell)
