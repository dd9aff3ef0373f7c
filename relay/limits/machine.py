"""The memory backend: upstream limits shared exactly by every process of one machine, and
kept across restarts, in one small SQLite database under the spool directory.

`relay serve` with `workers: N` runs N processes. Splitting each limit into N static parts
(what this module replaced) is exact only as an upper bound: a quota of 10 became 5 per
worker, so mail that all arrived on one client connection (one worker) got 5 through. Here
every process opens `spool/limits/limits.db` (WAL) and each decision is one short
transaction, so it is atomic across workers:

- quotas (`hourly`, `daily`, `quotas:`): the `limits` library's fixed windows over
  `SqliteStorage` (table `counters`, expiry in wall-clock time, so a window that started
  before a restart is still the same window after it);
- slow-down pauses (`pauses`: until when, wall clock, and why), seen by every worker and
  kept across restarts; each worker reads them all at most every PAUSES_FRESH seconds
  (every delivery asks), so another worker's pause reaches it within that time;
- minimum intervals (`spacing`): the next allowed start, CLOCK_MONOTONIC (one clock for
  every process of a boot; a stamp further ahead than the interval is from another boot);
- connections (`slots`): how many connections to an upstream each worker holds. A worker
  grows its holding by one when it opens a connection and there is room; a pooled idle
  connection keeps its slot, so the *open* connections are what is counted, and pooling
  stays on (a fresh connection per message would cost the throughput scenario a third of
  its rate). A worker that cannot grow marks that it waits; a worker holding more than its
  fair share (the limit over the workers that want connections) closes idle connections
  and gives their slots back. Waiters are served first come, first served. A dead
  worker's holding is reclaimed (its pid is gone) or reset when it restarts.

Each decision costs one SQLite transaction (~20-40 µs); only throttled upstreams pay it
per message, and connections only when they open or close. Durability: every commit
survives the process (restart, reload, kill -9); a checkpoint every second puts them on
disk against a power loss. Intake sliding windows stay in each process's memory, split
between workers (`partition.part`): they are checked per message on the hot path, where a
shared transaction per window would cost more than it gives (README: Limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from limits.aio.storage import MemoryStorage, Storage

from relay.core.sqlitefile import open_shared
from relay.limits.partition import Partition, part
from relay.limits.store import Lease, MemoryStore, Store, Window

log = logging.getLogger("relay.limits")

DB_NAME = "limits.db"
WANT_FOR = 1.0  # a waiter's claim lapses unless renewed this soon (it retries every CONN_POLL)
BALANCE_EVERY = 0.05  # how often a worker holding idle slots looks for waiters
# A worker that delivered this recently (seconds) still counts as wanting its fair share: a
# queue that empties for a moment between bursts must not hand its connections over, only
# to open new ones a moment later (the throughput scenario closed 250 upstream sessions per
# 8,000 messages without it); longer would keep idle connections from a worker with mail.
IDLE_GRACE = 0.1
CHECKPOINT_EVERY = 1.0
PAUSES_FRESH = 0.25

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, count INTEGER NOT NULL,
                                     expiry REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pauses (key TEXT PRIMARY KEY, until REAL NOT NULL,
                                   reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS spacing (key TEXT PRIMARY KEY, next REAL NOT NULL);
CREATE TABLE IF NOT EXISTS slots (key TEXT NOT NULL, worker INTEGER NOT NULL,
                                  pid INTEGER NOT NULL, held INTEGER NOT NULL,
                                  want_since REAL NOT NULL, want_until REAL NOT NULL,
                                  PRIMARY KEY (key, worker));
"""


def open_db(directory: Path) -> sqlite3.Connection:
    db = open_shared(directory / DB_NAME, _SCHEMA)
    db.execute("PRAGMA synchronous=NORMAL")
    # No checkpoint (and its fsync) on the event loop: MachineStore checkpoints every
    # second from a thread.
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db


class SqliteStorage(Storage):
    """A `limits` storage over the `counters` table: fixed windows shared by processes."""

    STORAGE_SCHEME = ["relay+sqlite"]

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(None)
        self.db = db

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        row = self.db.execute(
            "INSERT INTO counters (key, count, expiry) VALUES (?, ?, ?) ON CONFLICT(key) DO"
            " UPDATE SET count = CASE WHEN expiry <= ? THEN excluded.count"
            " ELSE count + excluded.count END,"
            " expiry = CASE WHEN expiry <= ? THEN excluded.expiry ELSE expiry END"
            " RETURNING count",
            (key, amount, now + expiry, now, now),
        ).fetchone()
        return int(row[0])

    async def get(self, key: str) -> int:
        row = self.db.execute(
            "SELECT count FROM counters WHERE key = ? AND expiry > ?", (key, time.time())
        ).fetchone()
        return int(row[0]) if row else 0

    async def get_expiry(self, key: str) -> float:
        now = time.time()
        row = self.db.execute(
            "SELECT expiry FROM counters WHERE key = ? AND expiry > ?", (key, now)
        ).fetchone()
        return float(row[0]) if row else now

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        return self.db.execute("DELETE FROM counters").rowcount

    async def clear(self, key: str) -> None:
        self.db.execute("DELETE FROM counters WHERE key = ?", (key,))


@dataclass
class _Holding:
    held: int = 0  # slots this process holds (its open connections are never more)
    busy: int = 0  # of which deliveries are using now
    checked: float = 0.0  # when we last looked for waiters
    used: float = 0.0  # when a delivery last started or ended (monotonic)


class MachineStore(Store):
    """Every limit of the upstreams, shared by the processes of this machine (see above)."""

    def __init__(self, directory: Path, partition: Partition | None = None,
                 node_id: str = "local") -> None:
        self.directory = directory
        self.db = open_db(directory)
        # Quotas in the shared database; intake windows go to `_intake` (consume below).
        super().__init__(SqliteStorage(self.db), node_id, sliding_storage=MemoryStorage())
        self.partition = partition
        self.worker = partition.index if partition else 0
        self._intake = MemoryStore(node_id)  # sliding intake windows: this process's part
        self._holdings: dict[str, _Holding] = {}
        self._limits: dict[str, int] = {}
        self._background: asyncio.Task[None] | None = None
        self._pauses: dict[str, tuple[float, str]] = {}  # key: (until, why), as last read
        self._pauses_read = -math.inf  # when (monotonic)
        # A restarted worker starts with no connections: whatever its index held is free.
        self.db.execute("DELETE FROM slots WHERE worker = ?", (self.worker,))

    # -- counting windows ------------------------------------------------------------------
    def _part(self, w: Window) -> Window:
        p = self.partition
        return w if p is None else replace(w, amount=part(w.amount, p.index, p.count))

    async def consume(
        self, windows: Sequence[Window], *, fixed: bool
    ) -> tuple[Window, float] | None:
        self._ensure_background()
        if fixed:
            return await super().consume(windows, fixed=True)
        full = await self._intake.consume([self._part(w) for w in windows], fixed=False)
        if full is None:
            return None
        window, wait = full  # reported as configured ("600 per minute"), not our part
        return next((w for w in windows if w.ident == window.ident), window), wait

    async def used(self, w: Window, *, fixed: bool) -> int:
        if fixed:
            return await super().used(w, fixed=True)
        return await self._intake.used(self._part(w), fixed=False)

    # -- connections -----------------------------------------------------------------------
    def local_share(self, limit: int) -> int:
        return limit  # any worker may hold every slot while the others need none

    def fresh_connections(self, limit: int | None) -> bool:
        return False  # idle pooled connections keep their slot (see the module's text)

    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        self._ensure_background()
        h = self._holdings.setdefault(key, _Holding())
        self._limits[key] = limit
        if h.busy < h.held or self._grow(key, limit, h):
            h.busy += 1
            h.used = time.monotonic()
            return Lease(self, key, "slot")
        return None

    async def unlease(self, lease: Lease) -> None:
        h = self._holdings.get(lease.key)
        if h is not None and h.busy > 0:
            h.busy -= 1
            h.used = time.monotonic()

    async def renew(self, leases: Sequence[Lease], ttl: float) -> None:
        return None  # holdings live as long as the process (a dead one's are reclaimed)

    async def leases(self, key: str) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(held), 0) FROM slots WHERE key = ?",
                              (key,)).fetchone()
        return int(row[0])

    def holding(self, key: str) -> tuple[int, int]:
        """(held, busy) of this process for `key`."""
        h = self._holdings.get(key)
        return (h.held, h.busy) if h else (0, 0)

    def take_surplus(self, key: str, *, force: bool = False) -> int:
        """Idle slots this process should give back now (others wait and it holds more than
        its fair share), taken off its holding at once so no delivery starts on them; the
        caller closes that many idle connections, then `give_back` frees them for the
        others. Looked up at most every BALANCE_EVERY per key unless `force`."""
        h = self._holdings.get(key)
        limit = self._limits.get(key)
        if h is None or limit is None or h.held <= h.busy:
            return 0
        mono = time.monotonic()
        if not force and mono - h.checked < BALANCE_EVERY:
            return 0
        h.checked = mono
        waiting = self.db.execute(
            "SELECT COUNT(*) FROM slots WHERE key = ? AND worker != ? AND want_until > ?",
            (key, self.worker, time.time()),
        ).fetchone()[0]
        if not waiting:
            return 0
        wants = h.busy > 0 or mono - h.used < IDLE_GRACE  # still has mail (or just had)
        competing = waiting + (1 if wants else 0)
        fair = 0 if not wants or limit < competing else math.ceil(limit / competing)
        n = max(0, min(h.held - h.busy, h.held - fair))
        h.held -= n
        return n

    def give_back(self, key: str) -> None:
        """Publish this process's holding after `take_surplus` (its connections are closed)."""
        h = self._holdings.get(key)
        if h is not None:
            # Giving back means it has more than it needs: it no longer waits either.
            self.db.execute("UPDATE slots SET held = ?, want_since = 0, want_until = 0"
                            " WHERE key = ? AND worker = ?", (h.held, key, self.worker))

    def idle_holdings(self) -> list[str]:
        return [k for k, h in self._holdings.items() if h.held > h.busy]

    def _grow(self, key: str, limit: int, h: _Holding) -> bool:
        now = time.time()
        db = self.db
        if self._surely_full(key, limit, h, now):
            return False  # and our claim as a waiter is fresh: no write needed
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                "SELECT worker, pid, held, want_since, want_until FROM slots WHERE key = ?",
                (key,),
            ).fetchall()
            mine = next((r for r in rows if r[0] == self.worker), None)
            others = [r for r in rows if r[0] != self.worker]
            total = h.held + sum(r[2] for r in others)
            if total >= limit:
                dead = [r for r in others if r[2] and not _alive(r[1])]
                for r in dead:
                    db.execute("DELETE FROM slots WHERE key = ? AND worker = ?", (key, r[0]))
                total -= sum(r[2] for r in dead)
            since = mine[3] if mine is not None and mine[4] > now and mine[3] else now
            # Waiters holding fewer go first; among equals, the one waiting longest.
            first = not any(r[4] > now and (r[2], r[3]) < (h.held, since) for r in others)
            if total < limit and first:
                h.held += 1
                db.execute(
                    "INSERT INTO slots VALUES (?, ?, ?, ?, 0, 0) ON CONFLICT(key, worker)"
                    " DO UPDATE SET pid = excluded.pid, held = excluded.held,"
                    " want_since = 0, want_until = 0",
                    (key, self.worker, os.getpid(), h.held),
                )
                granted = True
            else:
                db.execute(
                    "INSERT INTO slots VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key, worker)"
                    " DO UPDATE SET pid = excluded.pid, held = excluded.held,"
                    " want_since = excluded.want_since, want_until = excluded.want_until",
                    (key, self.worker, os.getpid(), h.held, since, now + WANT_FOR),
                )
                granted = False
            db.execute("COMMIT")
            return granted
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _surely_full(self, key: str, limit: int, h: _Holding, now: float) -> bool:
        """Every slot held by live-looking workers and our wait recorded recently: a read
        instead of a write transaction (a waiting worker asks 20 times a second)."""
        rows = self.db.execute(
            "SELECT worker, held, want_until FROM slots WHERE key = ?", (key,)
        ).fetchall()
        mine = next((r for r in rows if r[0] == self.worker), None)
        total = h.held + sum(r[1] for r in rows if r[0] != self.worker)
        return total >= limit and mine is not None and mine[2] - now > WANT_FOR / 2

    # -- intervals and pauses --------------------------------------------------------------
    async def space(self, key: str, interval: float) -> float:
        self._ensure_background()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT next FROM spacing WHERE key = ?", (key,)).fetchone()
            now = time.monotonic()
            nxt = float(row[0]) if row else 0.0
            if now < nxt <= now + interval:
                wait = nxt - now
            else:
                db.execute("INSERT OR REPLACE INTO spacing VALUES (?, ?)", (key, now + interval))
                wait = 0.0
            db.execute("COMMIT")
            return wait
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def pause(self, key: str, seconds: float, reason: str = "") -> None:
        self._ensure_background()
        until = time.time() + seconds
        self.db.execute(
            "INSERT INTO pauses VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET"
            " reason = CASE WHEN excluded.until > until THEN excluded.reason ELSE reason END,"
            " until = MAX(until, excluded.until)",
            (key, until, reason),
        )
        self._pauses_read = -math.inf  # this worker sees its own pause at once

    async def paused(self, key: str) -> float:
        return (await self.paused_why(key))[0]

    async def paused_why(self, key: str) -> tuple[float, str]:
        now = time.time()
        tick = time.monotonic()
        if tick - self._pauses_read >= PAUSES_FRESH:
            self._pauses = {
                str(k): (float(until), str(reason))
                for k, until, reason in self.db.execute(
                    "SELECT key, until, reason FROM pauses WHERE until > ?", (now,))
            }
            self._pauses_read = tick
        until, reason = self._pauses.get(key, (0.0, ""))
        return (until - now, reason) if until > now else (0.0, "")

    # -- lifecycle -------------------------------------------------------------------------
    def _ensure_background(self) -> None:
        if self._background is None or self._background.done():
            with contextlib.suppress(RuntimeError):  # no running loop (a synchronous caller)
                self._background = asyncio.get_running_loop().create_task(
                    self._checkpoints(), name="limits-checkpoint"
                )

    async def _checkpoints(self) -> None:
        """Put the WAL on disk every second (commits already survive the process)."""
        last = -1
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            changes = self.db.total_changes
            if changes != last:
                last = changes
                try:
                    await asyncio.to_thread(_checkpoint, self.directory)
                except sqlite3.Error as exc:
                    log.warning("limits database checkpoint failed: %s", exc)

    async def close(self) -> None:
        if self._background is not None:
            self._background.cancel()
            await asyncio.gather(self._background, return_exceptions=True)
            self._background = None
        with contextlib.suppress(sqlite3.Error):
            self.db.execute("DELETE FROM slots WHERE worker = ?", (self.worker,))
            self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        self.db.close()
        await self._intake.close()


def _checkpoint(directory: Path) -> None:
    db = sqlite3.connect(directory / DB_NAME, isolation_level=None, timeout=10.0)
    try:
        db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    finally:
        db.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
