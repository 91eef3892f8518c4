"""Grouped steps: ``StepScheduler.submit_many`` and ``Engine.step_many`` (the StepMany core).

The scheduler part uses the NumPy Elman of test_scheduler (a real RNN); the engine part runs the
quick zoo and compares with the eager PyTorch reference, one sequence at a time.
"""

from __future__ import annotations

import asyncio

import numpy as np
from eager import TOL, Reference
from test_engine import chunk_for, features, running
from test_scheduler import F, NumpyElman, make, reference, session

from serving.engine import StepResult
from serving.errors import InvalidInput, SessionNotFound, StepOutOfOrder


def test_a_group_split_over_lengths_answers_each_member_in_order():
    model = NumpyElman(seed=4)
    rng = np.random.default_rng(4)
    lengths = [1, 2, 1, 3, 1, 2]
    xs = [rng.normal(size=(t, F)).astype(np.float32) for t in lengths]
    committed: list[int] = []

    async def main():
        sched, pool, ex = await make(model, max_batch_size=2)
        sessions = [session(pool, i) for i in range(len(xs))]
        fut = sched.submit_many(sessions, xs, lambda pos, y, err: committed.append(pos))
        ys = await fut
        ex.shutdown()
        return ys, sched.batches

    ys, batches = asyncio.run(main())
    assert sorted(committed) == list(range(len(xs)))
    assert batches == len(model.calls) >= 4  # three lengths, at most 2 rows per batch
    assert all(b <= 2 and t in (1, 2, 3) for b, t, _ in model.calls)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_allclose(y, reference(model, [x]), atol=1e-5)


def test_a_failing_batch_fails_its_members_only():
    model = NumpyElman(seed=5, fail_when_batch_has=2)
    xs = [np.zeros((1, F), np.float32), np.zeros((1, F), np.float32), np.zeros((2, F), np.float32)]

    async def main():
        sched, pool, ex = await make(model)
        sessions = [session(pool, i) for i in range(3)]
        ys = await sched.submit_many(sessions, xs, lambda pos, y, err: None)
        ex.shutdown()
        return ys

    ys = asyncio.run(main())
    assert all(isinstance(y, Exception) for y in ys[:2])  # the batch of two T=1 rows failed
    assert isinstance(ys[2], np.ndarray) and ys[2].shape == (2, 2)


def test_step_many_mixed_models_duplicates_retries_and_errors_equal_the_offline_run(quick_store):
    ref = Reference(quick_store)
    rng = np.random.default_rng(11)
    models = ["sum_sign_lstm", "sine", "char", "elman"]

    async def main():
        async with running(quick_store, max_batch_size=8) as e:
            sids = {m: e.open_session(m).session_id for m in models}
            lookups = {m: e.lookup(sid) for m, sid in sids.items()}
            dup = e.open_session("elman").session_id
            sent: dict[str, list[np.ndarray]] = {s: [] for s in [*sids.values(), dup]}
            got: dict[str, list[np.ndarray]] = {s: [] for s in sent}
            for k in range(3):
                steps, owners = [], []
                for m in models:
                    x = chunk_for(e, m, rng, 1 + (k + len(m)) % 3)
                    sess, rt = lookups[m]
                    steps.append((sess, rt, x, k))
                    owners.append(sess.id)
                    sent[sess.id].append(x)
                if k:  # a retry of the last step first, then the new one: the cached reply
                    sess, rt = lookups["sine"]
                    steps.insert(0, (sess, rt, sent[sess.id][k - 1], k - 1))
                    owners.insert(0, "retry")
                dsess, drt = e.lookup(dup)
                for j in (2 * k, 2 * k + 1):  # one session twice in one call, in order
                    x = features(rng, 1 + j % 2)
                    steps.append((dsess, drt, x, j))
                    owners.append(dup)
                    sent[dup].append(x)
                sess, rt = lookups["elman"]
                steps.append((sess, rt, features(rng, 1), 7))  # a gap: fails alone
                owners.append("gap")
                steps.append((sess, rt, features(rng, 1), -1))  # a bad index: fails alone
                owners.append("negative")
                outcomes = await e.step_many(steps)
                for owner, out in zip(owners, outcomes, strict=True):
                    if owner == "gap":
                        assert isinstance(out, StepOutOfOrder) and out.expected == k + 1
                    elif owner == "negative":
                        assert isinstance(out, InvalidInput)
                    elif owner == "retry":
                        assert isinstance(out, StepResult) and out.step_index == k - 1
                        np.testing.assert_array_equal(out.y, got[sids["sine"]][-1])
                    else:
                        assert isinstance(out, StepResult), out
                        got[owner].append(out.y)
            e.close_session(dup)
            with_closed = await e.step_many([(dsess, drt, features(rng, 1), 6)])
            assert isinstance(with_closed[0], SessionNotFound)
            assert all(e.lookup(s)[0].busy is False for s in sids.values())
            return sids, dup, sent, got

    sids, dup, sent, got = asyncio.run(main())
    for m, sid in sids.items():
        np.testing.assert_allclose(np.concatenate(got[sid]), ref.run(m, sent[sid]), atol=TOL)
    np.testing.assert_allclose(np.concatenate(got[dup]), ref.run("elman", sent[dup]), atol=TOL)


def test_step_many_cancelled_before_its_groups_start_leaves_sessions_usable(quick_store):
    """A StepMany caller cancelled in the same loop turn (client gone): the sessions it claimed
    must still be released, or every later step on them would wait forever."""
    rng = np.random.default_rng(13)

    async def main():
        async with running(quick_store) as e:
            sid = e.open_session("elman").session_id
            sess, rt = e.lookup(sid)
            call = asyncio.ensure_future(e.step_many([(sess, rt, features(rng, 1), None)]))
            await asyncio.sleep(0)  # step_many runs up to its await; its groups are not started
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            return await asyncio.wait_for(e.step(sid, features(rng, 1)), 5.0)

    result = asyncio.run(main())
    assert result.y.shape[0] == 1


def test_step_block_cancelled_before_its_block_runs_leaves_sessions_committed_and_usable(
    quick_store,
):
    """The block equivalent: the caller is cancelled after step_block claimed its sessions and
    queued the block, before the block ran. Each claimed step still happens (its reply cached)
    and every gate is released."""
    rng = np.random.default_rng(14)

    async def main():
        async with running(quick_store) as e:
            sids = [e.open_session("elman").session_id for _ in range(3)]
            sessions = [e.lookup(sid)[0] for sid in sids]
            x = np.stack([features(rng, 1) for _ in sids])  # (N, T, F)
            call = asyncio.ensure_future(e.step_block(e.runtime_of(sessions[0]), sessions, x))
            await asyncio.sleep(0)  # claimed and queued; the block has not run yet
            assert all(s.busy for s in sessions)
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            assert call.cancelled()
            retries = [
                await asyncio.wait_for(e.step(sid, x[i], 0), 5.0) for i, sid in enumerate(sids)
            ]
            nexts = [await asyncio.wait_for(e.step(sid, features(rng, 1)), 5.0) for sid in sids]
            return retries, nexts, sessions

    retries, nexts, sessions = asyncio.run(main())
    assert [r.step_index for r in retries] == [0, 0, 0]  # the cancelled block's steps happened
    assert [r.step_index for r in nexts] == [1, 1, 1]
    assert not any(s.busy for s in sessions)
