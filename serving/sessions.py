"""Sessions and where their recurrent state lives.

``StatePool``: one model version's states in preallocated arrays ``(L, capacity, H)``, one per state
tensor; a session owns a row (a *slot*). Batching gathers rows with fancy indexing and scatters the
new states back, so nothing is allocated per session per step and the arrays grow by doubling.

``SessionStore``: session ids → ``Session`` records, the idle TTL and the capacity limit. An idle
session costs memory only: no task, thread or timer of its own. Expiry is lazy (checked when the id
is used) plus one periodic ``sweep`` that walks the least-recently-used end of an ordered dict, so a
sweep costs O(expired), not O(live). Expired ids are remembered in a bounded tombstone set, which is
how an expired session is told apart from one that never existed.

The store is in-memory; its interface (open/get/close/sweep/count) is what a durable or shared store
would implement next.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from serving.errors import (
    CapacityExhausted,
    InvalidInput,
    RnnServeError,
    SessionExpired,
    SessionNotFound,
)
from serving.manifest import StateSpec

MAX_SESSION_ID_LENGTH = 256


class StatePool:
    """Recurrent states of every session of one model version, one row per session."""

    def __init__(self, specs: list[StateSpec], initial_capacity: int = 64) -> None:
        if initial_capacity < 1:
            raise ValueError(f"initial_capacity must be >= 1, got {initial_capacity}")
        self.specs = specs
        self.arrays = [  # each (L, capacity, H)
            np.empty(s.shape(initial_capacity), dtype=np.float32) for s in specs
        ]
        self._capacity = initial_capacity
        self._high_water = 0  # slots below this have been handed out at least once
        self._recycled: list[int] = []

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._high_water - len(self._recycled)

    def allocate(self) -> int:
        """A free slot holding the initial state."""
        if self._recycled:
            slot = self._recycled.pop()
        else:
            if self._high_water == self._capacity:
                self._grow()
            slot = self._high_water
            self._high_water += 1
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        self._recycled.append(slot)

    def reset(self, slot: int) -> None:
        for a, spec in zip(self.arrays, self.specs, strict=True):
            a[:, slot] = spec.init

    def gather(self, slots: np.ndarray) -> list[np.ndarray]:
        """States of ``slots`` stacked on the batch dimension: [(L, B, H)] (fresh copies)."""
        return [a[:, slots] for a in self.arrays]

    def scatter(self, slots: np.ndarray, states: list[np.ndarray]) -> None:
        for a, s in zip(self.arrays, states, strict=True):
            a[:, slots] = s

    def snapshot(self, slot: int) -> list[np.ndarray]:
        """One session's states [(L, H)] (copies), for tests and debugging."""
        return [a[:, slot].copy() for a in self.arrays]

    def _grow(self) -> None:
        new_capacity = self._capacity * 2
        grown = []
        for a, spec in zip(self.arrays, self.specs, strict=True):
            b = np.empty(spec.shape(new_capacity), dtype=np.float32)
            b[:, : self._capacity] = a
            grown.append(b)
        self.arrays = grown
        self._capacity = new_capacity


class Session:
    """One client sequence: a slot in its model's pool plus step bookkeeping."""

    __slots__ = (
        "busy",
        "closed",
        "id",
        "key",
        "last",
        "last_used",
        "next_index",
        "pool",
        "slot",
        "waiters",
    )

    def __init__(self, session_id: str, key: str, pool: StatePool, now: float) -> None:
        self.id = session_id
        self.key = key  # "name:version" of its model
        self.pool = pool
        self.slot = pool.allocate()
        self.next_index = 0  # the step_index the next new step must carry
        self.last: Any = None  # the reply to step next_index - 1 (for idempotent retries)
        self.last_used = now
        self.busy = False  # a step (or reset) holds the session
        self.waiters: deque[asyncio.Future[None]] | None = None  # created only on contention
        self.closed = False


# ---- per-session serialization ----------------------------------------------------------------
# An asyncio.Lock per session would cost ~200 bytes on every idle session; this gate costs two
# slots and allocates a queue only while calls actually contend. Ownership is handed to the first
# waiter on release, so concurrent calls run in arrival order.


async def acquire(sess: Session) -> None:
    if not sess.busy:
        sess.busy = True
        return
    if sess.waiters is None:
        sess.waiters = deque()
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sess.waiters.append(fut)
    try:
        await fut
    except asyncio.CancelledError:
        if fut.done() and not fut.cancelled():
            release(sess)  # ownership was handed over just before the cancel: pass it on
        raise


def release(sess: Session) -> None:
    """Hand the session to the next waiter, or free it (and its slot if it was closed meanwhile)."""
    while sess.waiters:
        fut = sess.waiters.popleft()
        if not fut.done():
            fut.set_result(None)  # busy stays True: the waiter owns it now
            return
    sess.waiters = None
    sess.busy = False
    if sess.closed:
        _free_slot(sess)


def _free_slot(sess: Session) -> None:
    if sess.slot >= 0:
        sess.pool.release(sess.slot)
        sess.slot = -1


# ---- the store --------------------------------------------------------------------------------


class SessionStore:
    """In-memory sessions with an idle TTL, a capacity limit and tombstones for expired ids."""

    def __init__(
        self,
        ttl_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
        tombstones: int = 65_536,
        on_evict: Callable[[Session, str], None] | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"session TTL must be > 0 seconds, got {ttl_s}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._live: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._max_tombstones = tombstones
        self._on_evict = on_evict or (lambda sess, reason: None)
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._live)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def open(self, key: str, pool: StatePool, session_id: str | None = None) -> Session:
        if session_id is None:
            session_id = secrets.token_urlsafe(16)  # 128 random bits
        else:
            self._check_client_id(session_id)
        if len(self._live) >= self.max_sessions:
            self.sweep()
            if len(self._live) >= self.max_sessions:
                raise CapacityExhausted(
                    f"session capacity full ({self.max_sessions} open sessions); close idle "
                    "sessions or retry later"
                )
        sess = Session(session_id, key, pool, self._clock())
        self._live[session_id] = sess
        self._expired.pop(session_id, None)
        self._counts[key] = self._counts.get(key, 0) + 1
        return sess

    def get(self, session_id: str) -> Session:
        """The live session, its idle deadline pushed back; SessionExpired / SessionNotFound."""
        sess = self._live.get(session_id)
        now = self._clock()
        if sess is None or (not sess.busy and now - sess.last_used > self.ttl_s):
            raise self._missing(session_id, sess)
        sess.last_used = now
        self._live.move_to_end(session_id)
        return sess

    def peek(self, session_id: str) -> Session | None:
        """The session if it is still held, without pushing its deadline back (for logging)."""
        return self._live.get(session_id)

    def get_many(self, session_ids: Iterable[str]) -> list[Session | RnnServeError]:
        """``get`` for many ids with one clock read: each id's session (deadline pushed back) or
        its error (SessionExpired / SessionNotFound), in order. The loop is inlined because
        StepMany blocks look up thousands of ids a second and a call per id was most of it."""
        now = self._clock()
        live, ttl, touch = self._live, self.ttl_s, self._live.move_to_end
        found: list[Session | RnnServeError] = []
        for session_id in session_ids:
            sess = live.get(session_id)
            if sess is None or (not sess.busy and now - sess.last_used > ttl):
                found.append(self._missing(session_id, sess))
                continue
            sess.last_used = now
            touch(session_id)
            found.append(sess)
        return found

    def _missing(self, session_id: str, sess: Session | None) -> RnnServeError:
        """The error for an id with no live session; ``sess`` (idle past the TTL) is evicted."""
        if sess is not None:
            self._evict(sess, "expired")
        if session_id in self._expired:
            return SessionExpired(
                f"session {session_id!r} expired after {self.ttl_s:g} s idle; open a new one"
            )
        return SessionNotFound(f"unknown session {session_id!r} (never opened or closed)")

    def close(self, session_id: str) -> None:
        sess = self.get(session_id)
        self._remove(sess)
        self._on_evict(sess, "closed")

    def expires_in(self, sess: Session) -> float:
        return max(0.0, sess.last_used + self.ttl_s - self._clock())

    def sweep(self) -> int:
        """Expire every session idle past the TTL; returns how many."""
        now = self._clock()
        expired = 0
        while self._live:
            sess = next(iter(self._live.values()))
            if now - sess.last_used <= self.ttl_s:
                break
            if sess.busy:  # in use right now: not idle
                sess.last_used = now
                self._live.move_to_end(sess.id)
                continue
            self._evict(sess, "expired")
            expired += 1
        return expired

    def close_all(self) -> None:
        for sess in list(self._live.values()):
            self._remove(sess)

    def _evict(self, sess: Session, reason: str) -> None:
        self._remove(sess)
        self._expired[sess.id] = None
        while len(self._expired) > self._max_tombstones:
            self._expired.popitem(last=False)
        self._on_evict(sess, reason)

    def _remove(self, sess: Session) -> None:
        del self._live[sess.id]
        self._counts[sess.key] -= 1
        sess.closed = True
        if not sess.busy:  # a busy session frees its slot when its step completes
            _free_slot(sess)

    def _check_client_id(self, session_id: str) -> None:
        if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
            raise InvalidInput(
                f"session id must be 1..{MAX_SESSION_ID_LENGTH} characters", field="session_id"
            )
        if session_id in self._live:
            raise InvalidInput(f"session {session_id!r} is already open", field="session_id")
