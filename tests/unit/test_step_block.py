"""The block path of packed StepMany: ``SessionStore.get_many`` / ``Engine.lookup_many``,
``StepScheduler.submit_block`` and ``Engine.step_block``.

Scheduler tests use the NumPy Elman of test_scheduler (a real RNN, compared with running each
session alone); engine tests run the quick zoo against the eager PyTorch reference and against
``Engine.step_many`` (the per-entry path the block path replaces).
"""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest
from eager import TOL, Reference
from test_engine import chunk_for, running
from test_scheduler import F, NumpyElman, ThreadRecordingElman, make, reference, session
from test_sessions import make_store

from serving.engine import Engine, StepResult
from serving.errors import (
    InvalidInput,
    RnnServeError,
    SessionExpired,
    SessionNotFound,
    StepOutOfOrder,
    Unavailable,
)
from serving.scheduler import StepCost
from serving.sessions import acquire, release

# ---- lookups ------------------------------------------------------------------------------------


def test_get_many_tells_expired_from_unknown_and_pushes_deadlines_back_like_get():
    store, pool, clock, evicted = make_store(ttl=10.0)
    a, b, c = (store.open("m:1", pool) for _ in range(3))
    clock.now += 6
    assert store.get_many([a.id])[0] is a  # a's deadline moves to now + 10
    c.busy = True  # a session in use is never expired
    clock.now += 6  # b and c idle 12 s, a 6 s
    found = store.get_many([a.id, b.id, "nope", c.id, b.id])
    assert found[0] is a and found[3] is c
    assert isinstance(found[1], SessionExpired) and isinstance(found[4], SessionExpired)
    assert type(found[2]) is SessionNotFound
    assert str(found[1]) == str(_error_of(store.get, b.id))  # the same words as get
    assert str(found[2]) == str(_error_of(store.get, "nope"))
    assert evicted == [(b.id, "expired")] and b.slot == -1  # evicted once, its slot freed
    clock.now += 9  # a and c were touched by get_many 9 s ago: still alive
    assert store.get_many([a.id, c.id]) == [a, c]
    assert [s.last_used for s in (a, c)] == [clock.now] * 2
    assert store.sweep() == 0 and len(store) == 2


def _error_of(fn, *args) -> Exception:
    try:
        fn(*args)
    except Exception as err:
        return err
    raise AssertionError("no error")


def test_lookup_many_answers_session_and_model_or_the_error_per_id(quick_store):
    async def main():
        async with running(quick_store) as e:
            sine, lstm = e.open_session("sine"), e.open_session("seq_lstm")
            idle = e.open_session("sine")
            e.lookup(idle.session_id)[0].last_used -= e.config.session_ttl_s + 1
            found = e.lookup_many([lstm.session_id, "nope", sine.session_id, idle.session_id])
            assert found[0] == e.lookup(lstm.session_id)
            assert found[2] == e.lookup(sine.session_id)
            assert found[0][1].manifest.name == "seq_lstm" and found[0][0].id == lstm.session_id
            assert type(found[1]) is SessionNotFound and type(found[3]) is SessionExpired
            assert e.runtime_of(found[2][0]) is found[2][1]

    asyncio.run(main())


# ---- the scheduler ------------------------------------------------------------------------------


def rows(rng: np.random.Generator, n: int, steps: int) -> np.ndarray:
    return rng.normal(size=(n, steps, F)).astype(np.float32)  # (N, T, F)


class Parts:
    """Records a block's on_done calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, np.ndarray | None, BaseException | None]] = []

    def __call__(self, start, stop, y, err) -> None:
        self.calls.append((start, stop, None if y is None else y.copy(), err))

    def y(self) -> np.ndarray:
        return np.concatenate([y for _, _, y, _ in sorted(self.calls, key=lambda c: c[0])])


def test_a_block_runs_as_one_backend_call_with_singles_of_its_length():
    model = NumpyElman(seed=1)
    rng = np.random.default_rng(1)
    x_block, x_single, x_long = rows(rng, 5, 1), rows(rng, 1, 1)[0], rows(rng, 1, 2)[0]

    async def main():
        sched, pool, ex = await make(model)
        sessions = [session(pool, i) for i in range(8)]
        parts = Parts()
        single = sched.submit(sessions[5], x_single)
        done = sched.submit_block(sessions[:5], x_block, parts)
        long = sched.submit(sessions[6], x_long)  # another T: the next batch
        await asyncio.gather(single, done, long)
        await sched.stop()
        ex.shutdown()
        return parts, single.result(), long.result(), sched

    parts, single, long, sched = asyncio.run(main())
    assert [(b, t) for b, t, _ in model.calls] == [(6, 1), (1, 2)]
    assert [(start, stop, err) for start, stop, _, err in parts.calls] == [(0, 5, None)]
    for i in range(5):
        np.testing.assert_allclose(parts.y()[i], reference(model, [x_block[i]]), atol=1e-6)
    np.testing.assert_allclose(single, reference(model, [x_single]), atol=1e-6)
    np.testing.assert_allclose(long, reference(model, [x_long]), atol=1e-6)
    assert sched.rows == 7 and sched.batches == 2 and sched.pending == 0


def test_a_block_over_the_batch_size_is_split_and_keeps_its_place_in_line():
    model = NumpyElman(seed=2)
    rng = np.random.default_rng(2)
    first, x_block, after = rows(rng, 3, 1), rows(rng, 10, 1), rows(rng, 2, 1)

    async def main():
        sched, pool, ex = await make(model, max_batch_size=4)
        sessions = [session(pool, i) for i in range(15)]
        parts = Parts()
        singles = [sched.submit(sessions[i], first[i]) for i in range(3)]
        done = sched.submit_block(sessions[3:13], x_block, parts)
        later = [sched.submit(sessions[13 + i], after[i]) for i in range(2)]
        await asyncio.gather(*singles, done, *later)
        await sched.stop()
        ex.shutdown()
        return parts

    parts = asyncio.run(main())
    # 3 singles + 1 block row | 4 block rows | 4 block rows | the last block row + 2 singles
    assert [b for b, _, _ in model.calls] == [4, 4, 4, 3]
    assert [(start, stop) for start, stop, _, _ in parts.calls] == [(0, 1), (1, 5), (5, 9), (9, 10)]
    for i in range(10):
        np.testing.assert_allclose(parts.y()[i], reference(model, [x_block[i]]), atol=1e-6)


def test_steps_of_a_blocks_sessions_never_join_or_overtake_it():
    """Used directly (the engine's gates never queue two steps of one session), the scheduler
    still keeps each session's steps in submission order and one per batch."""
    model = NumpyElman(seed=3)
    rng = np.random.default_rng(3)
    x = {k: rows(rng, 2, 1) for k in ("before", "block", "after")}

    async def main():
        sched, pool, ex = await make(model)
        a, b = session(pool, 0), session(pool, 1)
        parts = Parts()
        before = sched.submit(a, x["before"][0])  # a: before the block, so the block waits
        done = sched.submit_block([a, b], x["block"], parts)
        after = sched.submit(b, x["after"][1])  # b: after the block, so it waits for it
        await asyncio.gather(before, done, after)
        await sched.stop()
        ex.shutdown()
        return before.result(), parts.y(), after.result()

    before, block, after = asyncio.run(main())
    assert [b for b, _, _ in model.calls] == [1, 2, 1]
    np.testing.assert_allclose(
        np.concatenate([before, block[0]]), reference(model, [x["before"][0], x["block"][0]]),
        atol=1e-6,
    )  # fmt: skip
    np.testing.assert_allclose(
        np.concatenate([block[1], after]), reference(model, [x["block"][1], x["after"][1]]),
        atol=1e-6,
    )  # fmt: skip


def test_submit_block_refuses_repeated_sessions_and_mismatched_rows():
    async def main():
        sched, pool, ex = await make(NumpyElman())
        a, b = session(pool, 0), session(pool, 1)
        with pytest.raises(ValueError, match="distinct"):
            sched.submit_block([a, b, a], np.zeros((3, 1, F), np.float32), Parts())
        with pytest.raises(ValueError, match="2 sessions for 3 rows"):
            sched.submit_block([a, b], np.zeros((3, 1, F), np.float32), Parts())
        empty = sched.submit_block([], np.zeros((0, 1, F), np.float32), Parts())
        assert empty.done() and sched.pending == 0
        await sched.stop()
        with pytest.raises(Unavailable):
            sched.submit_block([a], np.zeros((1, 1, F), np.float32), Parts())
        ex.shutdown()

    asyncio.run(main())


def test_a_failing_block_fails_every_row_and_moves_no_state():
    model = NumpyElman(fail_when_batch_has=3)
    x = np.ones((3, 1, F), np.float32)

    async def main():
        sched, pool, ex = await make(model)
        sessions = [session(pool, i) for i in range(3)]
        slots = np.array([s.slot for s in sessions])
        before = pool.gather(slots)[0].copy()
        parts = Parts()
        await sched.submit_block(sessions, x, parts)
        after = pool.gather(slots)[0]
        alone = await sched.submit(sessions[0], x[0])  # the scheduler keeps serving
        await sched.stop()
        ex.shutdown()
        return parts, before, after, alone

    parts, before, after, alone = asyncio.run(main())
    [(start, stop, y, err)] = parts.calls
    assert (start, stop, y) == (0, 3, None)
    assert isinstance(err, RnnServeError) and "exploded" in str(err)
    np.testing.assert_array_equal(before, after)
    np.testing.assert_allclose(alone, reference(model, [x[0]]), atol=1e-6)


def test_blocks_follow_the_inline_budget_and_the_queue_delay_counts_their_rows():
    model = ThreadRecordingElman()
    rng = np.random.default_rng(4)
    small, large = rows(rng, 4, 1), rows(rng, 8, 1)

    async def main():
        # 10 µs per row, budget 50 µs: 4 rows inline, 8 rows in the executor; a block of
        # max_batch_size rows starts at once despite the 10 s queue delay
        sched, pool, ex = await make(model, inline_budget_s=50e-6, max_queue_delay_s=10.0)
        sched.max_batch_size = 8
        sched.cost = StepCost(10e-6, 10e-6)
        sessions = [session(pool, i) for i in range(12)]
        loop_thread = threading.get_ident()
        small_parts, large_parts = Parts(), Parts()
        await asyncio.wait_for(sched.submit_block(sessions[4:], large, large_parts), 5.0)
        sched.max_queue_delay_s = 0.0
        await asyncio.sleep(0.002)  # idle again: a cheap batch right after an answer hops
        await sched.submit_block(sessions[:4], small, small_parts)
        await sched.stop()
        ex.shutdown()
        return loop_thread, small_parts, large_parts, sched

    loop_thread, small_parts, large_parts, sched = asyncio.run(main())
    assert [b for b, _, _ in model.calls] == [8, 4]
    assert model.threads[0] != loop_thread and model.threads[1] == loop_thread
    assert sched.inline_batches == 1
    for i in range(4):
        np.testing.assert_allclose(small_parts.y()[i], reference(model, [small[i]]), atol=1e-6)
    for i in range(8):
        np.testing.assert_allclose(large_parts.y()[i], reference(model, [large[i]]), atol=1e-6)


# ---- the engine ---------------------------------------------------------------------------------


def block_for(e: Engine, model: str, rng: np.random.Generator, n: int, steps: int) -> np.ndarray:
    return np.stack([chunk_for(e, model, rng, steps) for _ in range(n)])  # (N, T, ...)


def states_of(sessions) -> list[np.ndarray]:
    return [np.concatenate(s.pool.snapshot(s.slot)) for s in sessions]


@pytest.mark.parametrize("model", ["seq_lstm", "sine", "char"])
def test_step_block_equals_step_many_and_the_eager_run(quick_store, model):
    ref = Reference(quick_store)
    rng = np.random.default_rng(5)
    n = 6

    async def main():
        async with running(quick_store) as e:
            sent = [block_for(e, model, rng, n, steps) for steps in (1, 3, 2)]
            block = [e.lookup(e.open_session(model).session_id)[0] for _ in range(n)]
            many = [e.lookup(e.open_session(model).session_id) for _ in range(n)]
            rt = e.runtime_of(block[0])
            got_block, got_many = [], []
            for k, x in enumerate(sent):
                indexes = None if k == 1 else [k] * n  # "the next one" works as well
                r = await e.step_block(rt, block, x, indexes)
                assert r.errors == {} and r.step_indexes == [k] * n
                got_block.append(r.y)
                outs = await e.step_many([(s, rt, x[i], k) for i, (s, _) in enumerate(many)])
                got_many.append(np.stack([o.y for o in outs]))
                assert [s.next_index for s in block] == [k + 1] * n
            states = states_of(block), states_of([s for s, _ in many])
            assert not any(s.busy for s in block)
            return sent, got_block, got_many, states

    sent, got_block, got_many, (block_states, many_states) = asyncio.run(main())
    for b, m in zip(got_block, got_many, strict=True):
        np.testing.assert_allclose(b, m, atol=1e-6)
    for b, m in zip(block_states, many_states, strict=True):
        np.testing.assert_allclose(b, m, atol=1e-6)
    for i in range(n):
        got = np.concatenate([y[i] for y in got_block])
        np.testing.assert_allclose(got, ref.run(model, [x[i] for x in sent]), atol=TOL)


def test_retries_duplicates_bad_indexes_and_closed_sessions_fail_or_answer_alone(quick_store):
    ref = Reference(quick_store)
    rng = np.random.default_rng(6)

    async def main():
        async with running(quick_store, max_batch_size=4) as e:
            s = [e.lookup(e.open_session("seq_lstm").session_id)[0] for _ in range(6)]
            rt = e.runtime_of(s[0])
            x0 = block_for(e, "seq_lstm", rng, 6, 2)
            first = await e.step_block(rt, s, x0, [0] * 6)
            closed = s[5]
            e.close_session(closed.id)
            x1 = block_for(e, "seq_lstm", rng, 8, 2)
            # 0: retry of 0 (cached); 1: gap; 2: negative; 3: new step; then 3 again (its next
            # step, in order), 4: new step, closed session, 0 again with its new step
            order = [s[0], s[1], s[2], s[3], s[3], s[4], closed, s[0]]
            wants = [0, 5, -1, 1, 2, 1, 1, 1]
            r = await e.step_block(rt, order, x1, wants)
            short = await e.step_block(rt, [s[0]], x1[:1, :1], [1])  # retry with another T
            return s, first, x0, x1, r, short

    s, first, x0, x1, r, short = asyncio.run(main())
    assert sorted(r.errors) == [1, 2, 6]
    assert isinstance(r.errors[1], StepOutOfOrder) and r.errors[1].expected == 1
    assert isinstance(r.errors[2], InvalidInput) and r.errors[2].field == "step_index"
    assert isinstance(r.errors[6], SessionNotFound)
    assert r.step_indexes == [0, 0, 0, 1, 2, 1, 0, 1]
    np.testing.assert_array_equal(r.y[0], first.y[0])  # the cached reply, state not advanced
    assert not r.y[[1, 2, 6]].any()
    np.testing.assert_allclose(r.y[7], ref.run("seq_lstm", [x0[0], x1[7]])[2:], atol=TOL)
    three = np.concatenate([r.y[3], r.y[4]])
    np.testing.assert_allclose(three, ref.run("seq_lstm", [x0[3], x1[3], x1[4]])[2:], atol=TOL)
    np.testing.assert_allclose(r.y[5], ref.run("seq_lstm", [x0[4], x1[5]])[2:], atol=TOL)
    assert list(short.errors) == [0] and "answered with 2 time steps" in str(short.errors[0])
    assert short.errors[0].field == "steps"
    assert not any(x.busy for x in s)


def test_a_busy_session_waits_its_turn_and_a_block_retry_answers_any_transport(quick_store):
    ref = Reference(quick_store)
    rng = np.random.default_rng(7)

    async def main():
        async with running(quick_store) as e:
            sids = [e.open_session("sine").session_id for _ in range(3)]
            s = [e.lookup(sid)[0] for sid in sids]
            rt = e.runtime_of(s[0])
            x = block_for(e, "sine", rng, 3, 1)
            await acquire(s[1])  # another call holds s[1]'s gate
            call = asyncio.ensure_future(e.step_block(rt, s, x, [0, 0, 0]))
            await asyncio.sleep(0.05)
            assert not call.done() and s[0].next_index == 1  # the others already ran
            release(s[1])
            r = await asyncio.wait_for(call, 5.0)
            retry = await e.step(sids[2], x[2], 0)  # the block's reply, cached for any transport
            return r, x, retry

    r, x, retry = asyncio.run(main())
    assert r.errors == {} and r.step_indexes == [0, 0, 0]
    for i in range(3):
        np.testing.assert_allclose(r.y[i], ref.run("sine", [x[i]]), atol=TOL)
    assert isinstance(retry, StepResult) and retry.step_index == 0
    np.testing.assert_array_equal(retry.y, r.y[2])


def test_step_block_while_stopping_answers_unavailable_for_every_entry(quick_store):
    async def main():
        async with running(quick_store) as e:
            s = e.lookup(e.open_session("sine").session_id)[0]
            e.stopping = True
            r = await e.step_block(e.runtime_of(s), [s, s], np.zeros((2, 1, 1), np.float32))
            e.stopping = False
            return r, s

    r, s = asyncio.run(main())
    assert sorted(r.errors) == [0, 1] and all(type(v) is Unavailable for v in r.errors.values())
    assert r.y.shape == (2, 1, 1) and not s.busy and s.next_index == 0


def test_blocks_and_single_steps_under_random_interleaving_equal_the_offline_run(quick_store):
    """Block-driven and single-step sessions of one model at once, with batches small enough
    that blocks are split and share backend calls with single steps."""
    ref = Reference(quick_store)
    rng = np.random.default_rng(8)
    shuffle = random.Random(8)
    n_block, n_single, rounds = 12, 10, 4
    lengths = [1, 2, 1, 1]  # per round; single steps use the same lengths, so batches mix

    async def main():
        async with running(quick_store, max_batch_size=8) as e:
            blocks = [[e.lookup(e.open_session("seq_gru").session_id)[0] for _ in range(6)]]
            blocks.append([e.lookup(e.open_session("seq_gru").session_id)[0] for _ in range(6)])
            singles = [e.open_session("seq_gru").session_id for _ in range(n_single)]
            rt = e.runtime_of(blocks[0][0])
            sent: dict[str, list[np.ndarray]] = {}
            got: dict[str, list[np.ndarray]] = {}

            async def drive_block(sessions):
                for k in range(rounds):
                    await asyncio.sleep(shuffle.random() * 0.002)
                    x = block_for(e, "seq_gru", rng, len(sessions), lengths[k])
                    r = await e.step_block(rt, sessions, x, [k] * len(sessions))
                    assert r.errors == {}
                    for i, sess in enumerate(sessions):
                        sent.setdefault(sess.id, []).append(x[i])
                        got.setdefault(sess.id, []).append(r.y[i])

            async def drive_single(sid):
                for k in range(rounds):
                    await asyncio.sleep(shuffle.random() * 0.002)
                    x = chunk_for(e, "seq_gru", rng, lengths[k])
                    sent.setdefault(sid, []).append(x)
                    got.setdefault(sid, []).append((await e.step(sid, x, k)).y)

            await asyncio.gather(*map(drive_block, blocks), *map(drive_single, singles))
            return sent, got, rt.scheduler.rows

    sent, got, sched_rows = asyncio.run(main())
    assert len(sent) == n_block + n_single
    for sid, chunks in sent.items():
        want = ref.run("seq_gru", chunks)
        np.testing.assert_allclose(np.concatenate(got[sid]), want, atol=TOL, err_msg=sid)
    assert sched_rows == (n_block + n_single) * rounds


def test_a_block_and_single_steps_arriving_together_share_one_backend_call(quick_store):
    ref = Reference(quick_store)
    rng = np.random.default_rng(9)

    async def main():
        async with running(quick_store) as e:
            block = [e.lookup(e.open_session("sine").session_id)[0] for _ in range(5)]
            singles = [e.open_session("sine").session_id for _ in range(3)]
            rt = e.runtime_of(block[0])
            x = block_for(e, "sine", rng, 8, 1)
            before = rt.scheduler.batches
            r, *ones = await asyncio.gather(
                e.step_block(rt, block, x[:5]),
                *(e.step(sid, x[5 + i]) for i, sid in enumerate(singles)),
            )
            return r, ones, rt.scheduler.batches - before, x

    r, ones, batches, x = asyncio.run(main())
    assert batches == 1
    for i in range(5):
        np.testing.assert_allclose(r.y[i], ref.run("sine", [x[i]]), atol=TOL)
    for i, one in enumerate(ones):
        np.testing.assert_allclose(one.y, ref.run("sine", [x[5 + i]]), atol=TOL)


def test_a_scheduler_that_refuses_the_block_fails_its_entries_and_releases_them(quick_store):
    async def main():
        async with running(quick_store) as e:
            s = [e.lookup(e.open_session("sine").session_id)[0] for _ in range(2)]
            rt = e.runtime_of(s[0])
            await rt.scheduler.stop()
            r = await e.step_block(rt, s, np.zeros((2, 1, 1), np.float32))
            return r, s

    r, s = asyncio.run(main())
    assert sorted(r.errors) == [0, 1] and all(type(v) is Unavailable for v in r.errors.values())
    assert not any(x.busy for x in s) and [x.next_index for x in s] == [0, 0]
