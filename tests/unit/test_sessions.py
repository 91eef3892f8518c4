"""SessionStore and StatePool: slots, growth, TTL vs unknown, tombstones, capacity, the gate."""

import asyncio

import numpy as np
import pytest

from serving.errors import CapacityExhausted, InvalidInput, SessionExpired, SessionNotFound
from serving.manifest import StateSpec
from serving.sessions import SessionStore, StatePool, acquire, release

SPECS = [StateSpec("h", layers=2, size=3), StateSpec("c", layers=2, size=3, init=0.5)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_store(ttl: float = 10.0, cap: int = 100, **kw):
    clock = FakeClock()
    evicted = []
    store = SessionStore(
        ttl, cap, clock=clock, on_evict=lambda s, r: evicted.append((s.id, r)), **kw
    )
    return store, StatePool(SPECS, initial_capacity=2), clock, evicted


# ---- StatePool ----------------------------------------------------------------------------------


def test_pool_slots_start_at_the_initial_state_and_growth_keeps_every_state():
    pool = StatePool(SPECS, initial_capacity=2)
    slots = [pool.allocate() for _ in range(5)]  # grows 2 -> 4 -> 8
    assert pool.capacity == 8 and pool.in_use == 5 and len(set(slots)) == 5
    assert all(a.shape == (2, 8, 3) for a in pool.arrays)
    for s in slots:
        h, c = pool.snapshot(s)
        assert np.all(h == 0.0) and np.all(c == 0.5)
    marks = np.asarray(slots)
    pool.scatter(marks, [np.arange(30, dtype=np.float32).reshape(2, 5, 3)] * 2)
    pool.allocate()  # 6 of 8: no growth; earlier writes survive growth done before them
    before = [a.copy() for a in pool.gather(marks)]
    for _ in range(3):
        pool.allocate()  # forces 8 -> 16
    assert pool.capacity == 16
    for a, b in zip(pool.gather(marks), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pool_gather_is_a_copy_and_scatter_writes_only_the_given_rows():
    pool = StatePool(SPECS, initial_capacity=4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    h, _ = pool.gather(np.array([a, c]))  # (L, 2, H)
    h += 7  # must not touch the pool
    assert np.all(pool.snapshot(a)[0] == 0)
    pool.scatter(np.array([c, a]), [np.ones((2, 2, 3), np.float32) * 3, np.zeros((2, 2, 3))])
    assert np.all(pool.snapshot(a)[0] == 3) and np.all(pool.snapshot(c)[0] == 3)
    assert np.all(pool.snapshot(b)[0] == 0) and np.all(pool.snapshot(b)[1] == 0.5)


def test_a_released_slot_is_reused_with_a_fresh_state():
    pool = StatePool(SPECS, initial_capacity=2)
    s = pool.allocate()
    pool.scatter(np.array([s]), [np.full((2, 1, 3), 9, np.float32)] * 2)
    pool.release(s)
    assert pool.allocate() == s
    h, c = pool.snapshot(s)
    assert np.all(h == 0) and np.all(c == 0.5)


# ---- SessionStore -------------------------------------------------------------------------------


def test_session_ids_are_unguessable_and_distinct():
    store, pool, _, _ = make_store(cap=1000)
    ids = {store.open("m:1", pool).id for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) >= 22 for i in ids)  # token_urlsafe(16): 128 bits in 22 url-safe chars


def test_expired_is_told_apart_from_unknown_and_use_pushes_the_deadline_back():
    store, pool, clock, evicted = make_store(ttl=10)
    s = store.open("m:1", pool)
    clock.now += 9
    store.get(s.id)  # touched at +9: alive until +19
    clock.now += 9
    assert store.get(s.id) is s
    clock.now += 10.5
    with pytest.raises(SessionExpired, match="expired after 10 s idle"):
        store.get(s.id)
    with pytest.raises(SessionExpired):  # stays "expired", not "unknown"
        store.get(s.id)
    with pytest.raises(SessionNotFound, match="unknown session"):
        store.get("never-opened")
    assert evicted == [(s.id, "expired")]
    assert pool.in_use == 0 and len(store) == 0


def test_sweep_expires_idle_sessions_only_and_frees_their_slots():
    store, pool, clock, evicted = make_store(ttl=10)
    old = [store.open("m:1", pool) for _ in range(3)]
    clock.now += 6
    fresh = store.open("m:1", pool)
    store.get(old[0].id)  # used: not idle
    clock.now += 5
    assert store.sweep() == 2
    assert {i for i, _ in evicted} == {old[1].id, old[2].id}
    assert store.get(old[0].id) and store.get(fresh.id)
    assert pool.in_use == 2 and store.count("m:1") == 2


def test_a_busy_session_is_never_expired():
    store, pool, clock, _ = make_store(ttl=10)
    s = store.open("m:1", pool)
    s.busy = True
    clock.now += 100
    assert store.sweep() == 0
    assert store.get(s.id) is s


def test_tombstones_are_bounded():
    store, pool, clock, _ = make_store(ttl=1, tombstones=3)
    ids = [store.open("m:1", pool).id for _ in range(5)]
    clock.now += 2
    store.sweep()
    with pytest.raises(SessionNotFound):  # the oldest tombstones were dropped
        store.get(ids[0])
    with pytest.raises(SessionExpired):
        store.get(ids[4])


def test_capacity_is_a_clear_error_and_closing_or_expiry_makes_room():
    store, pool, clock, _ = make_store(ttl=10, cap=2)
    a = store.open("m:1", pool)
    store.open("m:2", pool)
    with pytest.raises(CapacityExhausted, match="capacity full"):
        store.open("m:1", pool)
    store.close(a.id)
    b = store.open("m:1", pool)
    clock.now += 11  # both idle past the TTL: opening sweeps them first
    store.open("m:1", pool)
    with pytest.raises(SessionExpired):
        store.get(b.id)


def test_closed_session_is_unknown_and_client_ids_must_be_new():
    store, pool, _, _ = make_store()
    s = store.open("m:1", pool, session_id="oip:m:7")
    with pytest.raises(InvalidInput, match="already open"):
        store.open("m:1", pool, session_id="oip:m:7")
    with pytest.raises(InvalidInput):
        store.open("m:1", pool, session_id="")
    store.close(s.id)
    with pytest.raises(SessionNotFound):
        store.get(s.id)
    assert store.open("m:1", pool, session_id="oip:m:7").id == "oip:m:7"  # reusable after close


def test_closing_a_busy_session_frees_its_slot_only_when_its_step_ends():
    store, pool, _, _ = make_store()
    s = store.open("m:1", pool)
    s.busy = True  # a step is in flight
    store.close(s.id)
    assert s.slot >= 0 and pool.in_use == 1  # the running batch still writes this row
    release(s)
    assert s.slot == -1 and pool.in_use == 0


# ---- the per-session gate -----------------------------------------------------------------------


def test_gate_serializes_calls_in_arrival_order_and_survives_cancelled_waiters():
    store, pool, _, _ = make_store()
    s = store.open("m:1", pool)
    order = []

    async def call(tag: str, hold: float) -> None:
        await acquire(s)
        try:
            order.append(f"{tag}+")
            await asyncio.sleep(hold)
            order.append(f"{tag}-")
        finally:
            release(s)

    async def main() -> None:
        first = asyncio.create_task(call("a", 0.02))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(call("x", 0))
        rest = [asyncio.create_task(call(t, 0)) for t in "bcd"]
        await asyncio.sleep(0.005)
        doomed.cancel()
        await asyncio.gather(first, *rest)
        assert doomed.cancelled()

    asyncio.run(main())
    assert order == ["a+", "a-", "b+", "b-", "c+", "c-", "d+", "d-"]
    assert not s.busy and s.waiters is None
