"""StepScheduler: batching rules and exact outputs, with a small real RNN written in NumPy.

The backend is a genuine (tiny) Elman RNN computed in NumPy, so outputs of batched runs can be
compared with running each session alone; it also records every batch the scheduler formed.
"""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serving.errors import RnnServeError, Unavailable
from serving.manifest import StateSpec
from serving.scheduler import StepScheduler
from serving.sessions import Session, StatePool

F, H, OUT = 3, 5, 2


class NumpyElman:
    """h_t = tanh(x_t W + h_{t-1} U), y_t = h_t V; states [(1, B, H)]."""

    def __init__(self, seed: int = 0, fail_when_batch_has: int | None = None) -> None:
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(F, H)).astype(np.float32)
        self.u = rng.normal(size=(H, H)).astype(np.float32) * 0.5
        self.v = rng.normal(size=(H, OUT)).astype(np.float32)
        self.calls: list[tuple[int, int, list[int]]] = []  # (B, T, slots seen via marker)
        self.fail_when_batch_has = fail_when_batch_has

    def step(self, x, states):
        b, t, _ = x.shape
        if self.fail_when_batch_has is not None and b == self.fail_when_batch_has:
            raise RuntimeError("backend exploded")
        self.calls.append((b, t, []))
        h = states[0][0]  # (B, H)
        ys = []
        for i in range(t):
            h = np.tanh(x[:, i] @ self.w + h @ self.u)
            ys.append(h @ self.v)
        return np.stack(ys, axis=1), [h[None]]  # (B, T, OUT), [(1, B, H)]


def reference(model: NumpyElman, chunks: list[np.ndarray]) -> np.ndarray:
    x = np.concatenate(chunks)[None]  # (1, T_total, F)
    y, _ = model.step(x, [np.zeros((1, 1, H), np.float32)])
    return y[0]


def run(coro):
    return asyncio.run(coro)


async def make(model, **kw):
    pool = StatePool([StateSpec("h", 1, H)], initial_capacity=4)
    executor = ThreadPoolExecutor(2)
    sched = StepScheduler("m:1", model, pool, executor, **kw)
    sched.start()
    return sched, pool, executor


def session(pool: StatePool, i: int) -> Session:
    return Session(f"s{i}", "m:1", pool, 0.0)


def test_many_sessions_with_mixed_lengths_match_running_each_alone():
    model = NumpyElman()
    rng = np.random.default_rng(1)
    n_sessions, n_steps = 60, 6
    chunks = {
        i: [
            rng.normal(size=(int(rng.integers(1, 4)), F)).astype(np.float32) for _ in range(n_steps)
        ]
        for i in range(n_sessions)
    }

    async def main():
        sched, pool, ex = await make(model, max_batch_size=16)
        sessions = [session(pool, i) for i in range(n_sessions)]

        async def drive(i):
            ys = []
            for x in chunks[i]:
                await asyncio.sleep(rng.random() * 0.001)
                ys.append(await sched.submit(sessions[i], x))
            return np.concatenate(ys)

        outs = await asyncio.gather(*(drive(i) for i in range(n_sessions)))
        await sched.stop()
        ex.shutdown()
        return outs, sched

    outs, sched = run(main())
    for i, y in enumerate(outs):
        np.testing.assert_allclose(y, reference(model, chunks[i]), atol=1e-6)
    assert sched.rows == n_sessions * n_steps
    assert sched.batches < sched.rows / 2, "steps of different sessions should share calls"
    assert max(b for b, _, _ in model.calls) <= 16


def test_a_batch_never_holds_two_steps_of_one_session_or_two_lengths():
    model = NumpyElman()

    async def main():
        sched, pool, ex = await make(model)
        a, b = session(pool, 0), session(pool, 1)
        x1 = np.ones((1, F), np.float32)
        x2 = np.ones((2, F), np.float32)
        # queued together while the loop has not run yet: a twice, and a T=2 step of b
        futs = [sched.submit(a, x1), sched.submit(a, x1), sched.submit(b, x2), sched.submit(b, x1)]
        ys = await asyncio.gather(*futs)
        await sched.stop()
        ex.shutdown()
        return ys

    ys = run(main())
    # a's second step waits for the next batch; b's T=2 step cannot join a T=1 batch, and b's
    # later T=1 step must not overtake it
    assert [(bsz, t) for bsz, t, _ in model.calls] == [(1, 1), (1, 1), (1, 2), (1, 1)]
    ones = np.ones((3, F), np.float32)
    np.testing.assert_allclose(np.concatenate(ys[:2]), reference(model, [ones[:2]]), atol=1e-6)
    np.testing.assert_allclose(np.concatenate(ys[2:]), reference(model, [ones]), atol=1e-6)


def test_a_lone_session_does_not_wait_for_a_timer():
    model = NumpyElman()

    async def main():
        sched, pool, ex = await make(model, max_queue_delay_s=0.0)
        s = session(pool, 0)
        await sched.submit(s, np.ones((1, F), np.float32))  # warm the executor thread
        started = time.perf_counter()
        for _ in range(20):
            await sched.submit(s, np.ones((1, F), np.float32))
        per_step = (time.perf_counter() - started) / 20
        await sched.stop()
        ex.shutdown()
        return per_step

    assert run(main()) < 0.005  # a thread hop, not a batching window


def test_queue_delay_gathers_a_fuller_batch():
    model = NumpyElman()

    async def main():
        # a window far wider than the arrivals: on a loaded 2-core machine 5 x 5 ms sleeps took
        # longer than the 50 ms this test had, and the last step missed the batch
        sched, pool, ex = await make(model, max_queue_delay_s=0.4, max_batch_size=8)
        sessions = [session(pool, i) for i in range(5)]
        futs = []
        for s in sessions:  # arrive 5 ms apart, all within the 400 ms window
            futs.append(sched.submit(s, np.ones((1, F), np.float32)))
            await asyncio.sleep(0.005)
        await asyncio.gather(*futs)
        await sched.stop()
        ex.shutdown()

    run(main())
    assert [b for b, _, _ in model.calls] == [5]


def test_a_failing_batch_fails_its_steps_and_the_loop_keeps_serving():
    model = NumpyElman(fail_when_batch_has=2)

    async def main():
        sched, pool, ex = await make(model)
        a, b = session(pool, 0), session(pool, 1)
        x = np.ones((1, F), np.float32)
        before = pool.gather(np.array([a.slot, b.slot]))[0].copy()
        results = await asyncio.gather(
            sched.submit(a, x), sched.submit(b, x), return_exceptions=True
        )
        after_fail = pool.gather(np.array([a.slot, b.slot]))[0]
        y = await sched.submit(a, x)  # B=1 works
        await sched.stop()
        with pytest.raises(Unavailable):
            sched.submit(a, x)
        ex.shutdown()
        return results, before, after_fail, y

    results, before, after_fail, y = run(main())
    assert all(isinstance(r, RnnServeError) and "exploded" in str(r) for r in results)
    np.testing.assert_array_equal(before, after_fail)  # no state moved on failure
    np.testing.assert_allclose(y, reference(model, [np.ones((1, F), np.float32)]), atol=1e-6)


def test_stop_runs_everything_already_queued():
    model = NumpyElman()

    async def main():
        sched, pool, ex = await make(model, max_batch_size=1)
        futs = [sched.submit(session(pool, i), np.ones((1, F), np.float32)) for i in range(4)]
        await sched.stop()
        ex.shutdown()
        return futs

    futs = run(main())
    assert all(f.done() and f.exception() is None for f in futs)
    assert len(model.calls) == 4


def test_bad_settings_are_refused_with_the_value():
    pool = StatePool([StateSpec("h", 1, H)])
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        StepScheduler("m", NumpyElman(), pool, None, max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue_delay"):
        StepScheduler("m", NumpyElman(), pool, None, max_queue_delay_s=-1)


class ThreadRecordingElman(NumpyElman):
    """Also records which thread ran each call."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    def step(self, x, states):
        import threading

        self.threads.append(threading.get_ident())
        return super().step(x, states)


def test_batches_within_the_inline_budget_run_on_the_loop_and_larger_ones_in_the_executor():
    import threading

    from serving.scheduler import StepCost

    model = ThreadRecordingElman()
    rng = np.random.default_rng(3)
    xs = {i: [rng.normal(size=(1, F)).astype(np.float32) for _ in range(4)] for i in range(12)}

    async def main():
        # predicted cost: 10 µs per row; budget 50 µs → batches of up to 5 rows run inline
        sched, pool, ex = await make(model, inline_budget_s=50e-6)
        sched.cost = StepCost(10e-6, 10e-6)
        sessions = [session(pool, i) for i in range(12)]
        loop_thread = threading.get_ident()
        lone = []
        for x in xs[0]:  # batches of 1 on an idle model: inline
            await asyncio.sleep(0.002)
            lone.append(await sched.submit(sessions[0], x))
        many = await asyncio.gather(  # one batch of 11 rows: executor
            *(sched.submit(sessions[i], xs[i][0]) for i in range(1, 12))
        )
        await sched.stop()
        ex.shutdown()
        return loop_thread, lone, many

    loop_thread, lone, many = run(main())
    sizes = [b for b, _, _ in model.calls]
    assert sizes == [1, 1, 1, 1, 11]
    assert model.threads[:4] == [loop_thread] * 4, "cheap batches should not hop threads"
    assert model.threads[4] != loop_thread, "a batch over budget must not block the loop"
    np.testing.assert_allclose(np.concatenate(lone), reference(model, xs[0]), atol=1e-6)
    for i, y in enumerate(many, start=1):
        np.testing.assert_allclose(y, reference(model, xs[i][:1]), atol=1e-6)


def test_an_inline_batch_that_raises_fails_only_that_batch():
    from serving.scheduler import StepCost

    model = NumpyElman(fail_when_batch_has=2)

    async def main():
        sched, pool, ex = await make(model, inline_budget_s=1.0)
        sched.cost = StepCost(0.0, 0.0)
        a, b, c = session(pool, 0), session(pool, 1), session(pool, 2)
        x = np.ones((1, F), np.float32)
        failed = await asyncio.gather(
            sched.submit(a, x), sched.submit(b, x), return_exceptions=True
        )
        await asyncio.sleep(0.002)  # idle again, so the next batch runs inline too
        alone = await sched.submit(c, x)  # the scheduler keeps going after the failure
        await sched.stop()
        ex.shutdown()
        return failed, alone, sched

    failed, alone, sched = run(main())
    assert all(isinstance(f, RnnServeError) and "backend exploded" in str(f) for f in failed)
    np.testing.assert_allclose(alone, reference(model, [np.ones((1, F), np.float32)]), atol=1e-6)
    assert sched.inline_batches == 2


def test_step_cost_prices_rows_and_time_steps_apart_through_four_timed_corners():
    from serving.scheduler import COST_MARGIN, CROSS_COST_MARGIN, StepCost

    # (1, 1) 40 µs, (32, 1) 350 µs, (1, 16) 220 µs, (32, 16) 2,855 µs: 10 µs a further row of
    # one step, 12 µs a further step of one row, 5 µs a further row × further step
    cost = StepCost.from_timings(32, 16, 40e-6, 350e-6, 220e-6, 2855e-6)
    m, mx = COST_MARGIN, CROSS_COST_MARGIN  # the slopes err high, (1, 1) is as timed
    assert cost.predict(1, 1) == pytest.approx(40e-6)
    assert cost.predict(32, 1) == pytest.approx(40e-6 + m * 310e-6)
    assert cost.predict(1, 16) == pytest.approx(40e-6 + m * 180e-6)
    assert cost.predict(32, 16) == pytest.approx(40e-6 + m * 490e-6 + mx * 2325e-6)
    assert cost.predict(1, 256) == pytest.approx(40e-6 + m * 255 * 12e-6)  # beyond the corners
    beyond = m * (63 * 10 + 255 * 12) + mx * 63 * 255 * 5
    assert cost.predict(64, 256) == pytest.approx(40e-6 + beyond * 1e-6)
    # a long step of one session costs more than a wide step of as many rows × steps
    assert cost.predict(1, 32) > cost.predict(32, 1)
    noisy = StepCost.from_timings(32, 16, 40e-6, 30e-6, 35e-6, 20e-6)  # a slow (1, 1) timing
    assert noisy.predict(64, 256) == pytest.approx(40e-6), "slopes are never negative"
    alone = StepCost.from_timings(1, 16, 40e-6, 40e-6, 220e-6, 220e-6)  # max_batch_size 1
    assert alone.predict(1, 16) == pytest.approx(40e-6 + m * 180e-6)
    assert StepCost().predict(1, 1) == float("inf"), "an unmeasured model always uses the executor"
    with pytest.raises(ValueError, match="inline_budget"):
        StepScheduler(
            "m", NumpyElman(), StatePool([StateSpec("h", 1, H)]), None, inline_budget_s=-1
        )


def test_a_cheap_batch_right_after_an_answer_takes_the_executor_so_the_next_ones_can_gather(
    monkeypatch,
):
    """Under load (steps keep coming right after answers) inline runs would be batches of one;
    the executor's hop is what lets the next steps gather. BUSY_GAP_S is stretched so "right
    after" does not depend on this machine's speed."""
    import threading

    from serving import scheduler
    from serving.scheduler import StepCost

    monkeypatch.setattr(scheduler, "BUSY_GAP_S", 60.0)
    model = ThreadRecordingElman()
    x = np.ones((1, F), np.float32)

    async def main():
        sched, pool, ex = await make(model, inline_budget_s=1.0)
        sched.cost = StepCost(0.0, 0.0)
        a = session(pool, 0)
        ys = [await sched.submit(a, x) for _ in range(3)]
        await sched.stop()
        ex.shutdown()
        return threading.get_ident(), ys, sched

    loop_thread, ys, sched = run(main())
    assert model.threads[0] == loop_thread, "the first batch finds the model idle"
    assert all(t != loop_thread for t in model.threads[1:]), "later ones follow an answer at once"
    assert sched.inline_batches == 1
    np.testing.assert_allclose(np.concatenate(ys), reference(model, [x, x, x]), atol=1e-6)


def raising(*args) -> None:
    raise RuntimeError("answer callback exploded")


def test_an_answer_callback_that_raises_costs_only_its_own_item_and_the_scheduler_keeps_going(
    caplog,
):
    """Each item of a batch is answered on its own: a raising on_done (of a single step, a
    block, a group member) is logged with the model's name and ends that item's future with an
    error; the rest of the batch gets its rows, and the next batches run as usual."""
    model = NumpyElman(fail_when_batch_has=3)
    rng = np.random.default_rng(7)
    xs = rng.normal(size=(13, 1, F)).astype(np.float32)  # one T=1 step per session

    async def main():
        sched, pool, ex = await make(model)
        s = [session(pool, i) for i in range(13)]
        committed: list[tuple] = []  # the normal block's (start, stop, y, err)
        # one batch (blocks path): each raising item comes before normal items
        mixed = [
            sched.submit(s[0], xs[0], raising),
            sched.submit_block(s[1:3], xs[1:3], raising),
            sched.submit_many(
                s[3:5], list(xs[3:5]), lambda pos, y, err: raising() if pos == 0 else None
            ),
            sched.submit(s[5], xs[5]),
            sched.submit_block(s[6:8], xs[6:8], lambda *part: committed.append(part)),
        ]
        mixed = await asyncio.wait_for(asyncio.gather(*mixed, return_exceptions=True), 5.0)
        # one batch of single steps only, then a failing batch of three (the backend raises)
        singles = [sched.submit(s[8], xs[8], raising), sched.submit(s[9], xs[9])]
        singles = await asyncio.wait_for(asyncio.gather(*singles, return_exceptions=True), 5.0)
        failed = [
            sched.submit(s[10], xs[10], raising),
            *(sched.submit(s[i], xs[i]) for i in (11, 12)),
        ]
        failed = await asyncio.wait_for(asyncio.gather(*failed, return_exceptions=True), 5.0)
        after = await asyncio.wait_for(sched.submit(s[5], xs[5]), 5.0)  # s[5]'s second step
        await sched.stop()
        ex.shutdown()
        return mixed, singles, failed, committed, after

    with caplog.at_level("ERROR", logger="serving.scheduler"):
        mixed, singles, failed, committed, after = asyncio.run(main())
    calls = [(b, t) for b, t, _ in model.calls]  # before the reference runs add theirs
    alone = {i: reference(model, [xs[i]]) for i in range(13)}
    answer_failed = (RnnServeError, "answering it failed")
    for got in (mixed[0], mixed[1], mixed[2][0], singles[0]):
        assert isinstance(got, answer_failed[0]) and answer_failed[1] in str(got), got
    np.testing.assert_allclose(mixed[2][1], alone[4], atol=1e-6)
    np.testing.assert_allclose(mixed[3], alone[5], atol=1e-6)
    assert mixed[4] is None and [part[:2] for part in committed] == [(0, 2)]
    assert committed[0][3] is None
    np.testing.assert_allclose(committed[0][2], np.stack([alone[6], alone[7]]), atol=1e-6)
    np.testing.assert_allclose(singles[1], alone[9], atol=1e-6)
    assert all(isinstance(f, RnnServeError) and "backend exploded" in str(f) for f in failed)
    np.testing.assert_allclose(after, reference(model, [xs[5], xs[5]])[1:], atol=1e-6)
    assert calls == [(8, 1), (2, 1), (1, 1)]  # and the failed call of 3
    logged = [r for r in caplog.records if "answering a step failed" in r.getMessage()]
    assert len(logged) == 5 and all("m:1" in r.getMessage() and r.exc_info for r in logged)


class ShortAnswerElman(NumpyElman):
    """A faulty step graph: while ``short`` names "outputs" or "states", that part of its answer
    has one row (e.g. a graph exported with a fixed batch of 1 in its outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.short: str | None = None

    def step(self, x, states):
        y, new_states = super().step(x, states)
        if self.short == "outputs":
            return y[:1], new_states
        if self.short == "states":
            return y, [s[:, :1] for s in new_states]
        return y, new_states


@pytest.mark.parametrize("short", ["outputs", "states"])
def test_a_step_graph_answering_fewer_rows_fails_the_batch_and_stores_no_state(short):
    """Every item still gets an answer (the error, naming the shapes), and no session's state
    moves. Unchecked, the items past the first row were never answered (their waiters hung, and
    a block's callback raised midway, leaving the engine's gates of its later sessions taken),
    or one session's new state was broadcast to every session of the batch."""
    model = ShortAnswerElman()
    rng = np.random.default_rng(11)
    xs = rng.normal(size=(7, 1, F)).astype(np.float32)

    async def main():
        sched, pool, ex = await make(model)
        s = [session(pool, i) for i in range(7)]
        for i in range(7):  # a first good step each, so the states differ from the initial one
            await sched.submit(s[i], xs[i])
        before = pool.gather(np.arange(7))[0].copy()
        model.short = short
        parts: list[tuple] = []  # the block's (start, stop, y, err)
        members: list[tuple] = []  # the group's (pos, y, err)
        answers = [
            sched.submit(s[0], xs[0]),
            sched.submit(s[1], xs[1]),
            sched.submit_block(s[2:5], xs[2:5], lambda *part: parts.append(part)),
            sched.submit_many(s[5:7], list(xs[5:7]), lambda *member: members.append(member)),
        ]
        answers = await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), 5.0)
        after = pool.gather(np.arange(7))[0].copy()
        model.short = None
        y = await asyncio.wait_for(sched.submit(s[4], xs[4]), 5.0)  # the scheduler goes on
        await sched.stop()
        ex.shutdown()
        return answers, parts, members, before, after, y

    answers, parts, members, before, after, y = run(main())
    shapes = "for 7 rows x 1 steps"
    for err in (answers[0], answers[1], *answers[3], *(e for *_, e in (*parts, *members))):
        assert isinstance(err, RnnServeError) and shapes in str(err), err
    assert answers[2] is None and [p[:3] for p in parts] == [(0, 3, None)]
    assert sorted(m[0] for m in members) == [0, 1] and all(m[1] is None for m in members)
    np.testing.assert_array_equal(after, before)  # no state stored, none broadcast
    np.testing.assert_allclose(y, reference(model, [xs[4], xs[4]])[1:], atol=1e-6)
