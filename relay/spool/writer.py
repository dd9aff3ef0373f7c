"""The spool's single writer thread: queued write operations, group commit, future settlement.

Every write to the spool database goes through one thread and one connection. The thread
takes everything queued (up to a cap), runs it in one transaction and commits once, so N
concurrent DATA replies share one WAL fsync (group commit). Each operation's failure stays
its own: one that fails having changed nothing (e.g. the size cap is hit) fails alone; one
that fails after changing rows has the batch run again with a SAVEPOINT per operation, so
that it is rolled back alone; a failure that loses the transaction for good (I/O error,
failed COMMIT) fails every operation in the batch. Futures are resolved only after COMMIT
has returned, with one `call_soon_threadsafe` per event loop per batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from relay.core.errors import SpoolError
from relay.spool.health import SpoolHealth, is_full

log = logging.getLogger("relay.spool")

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# Runs consecutive operations' bulk forms together (relay/spool/bulk.py); each returns None.
BulkRunner = Callable[[sqlite3.Connection, list[Any]], None]

MAX_BATCH_OPS = 512
MAX_BATCH_BYTES = 64 * 1024 * 1024
# How long a busy writer waits for more operations before its transaction (see `gather`).
GATHER_SECONDS = 0.002


@dataclass(slots=True)
class WriterStats:
    """Counters for metrics and the benchmark; written by the writer thread only."""

    commits: int = 0
    operations: int = 0
    failed_batches: int = 0
    largest_batch: int = 0


@dataclass(slots=True)
class _Job:
    op: Operation
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    size: int
    bulk: Any = None  # the same change for the bulk runner (its result is None)


class CommitHooks(Protocol):
    """What else a batch's transaction covers (the body segments): made durable before the
    COMMIT (an exception there fails the whole batch), finished after it, or forgotten when
    the transaction is rolled back."""

    def before_commit(self, conn: sqlite3.Connection) -> None: ...
    def after_commit(self) -> None: ...
    def after_failure(self) -> None: ...


class _NoHooks:
    def before_commit(self, conn: sqlite3.Connection) -> None:
        pass

    def after_commit(self) -> None:
        pass

    def after_failure(self) -> None:
        pass


_STOP = object()
_Settlement = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _failure(exc: Exception) -> BaseException:
    """What an operation's caller gets for its exception: storage errors as SpoolError."""
    return to_spool_error(exc) if isinstance(exc, sqlite3.Error | OSError) else exc


def to_spool_error(exc: BaseException) -> SpoolError:
    """A storage failure as the SpoolError the listener turns into 451 4.3.0 (no detail to
    the client; the reason, which names the SQLite error, is for the log)."""
    if isinstance(exc, SpoolError):
        return exc
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    err = SpoolError(reason=f"spool write failed: {name}: {exc}")
    err.__cause__ = exc
    return err


def _copy(exc: SpoolError) -> SpoolError:
    """One exception object per waiter: raising one shared instance in many tasks would
    chain their tracebacks together."""
    err = SpoolError(reason=exc.reason)
    err.__cause__ = exc.__cause__
    return err


def batch_scheduling() -> None:
    """Put the calling thread under SCHED_BATCH (Linux; elsewhere nothing happens).

    The writer wakes a few times per message (an operation queued, an fsync done, the GIL
    back after each SQLite step). Under the default policy each wake-up may preempt the
    event loop on its CPU: ~5,000 involuntary switches a second per worker at full load.
    SCHED_BATCH keeps the thread's fair share of CPU but never preempts on wake-up; it
    runs when a CPU is free or at the next tick. Measured at 5 KB, 2 workers: 0.62 ->
    0.53 ms CPU per message, +10% msg/s, final-dot-to-250 p99 unchanged
    (benchmarks/RESULTS.md §15). Durability is untouched: 250 still waits for the fsync."""
    setter = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setter is None or policy is None:
        return
    try:
        setter(0, policy, os.sched_param(0))  # 0: the calling thread (Linux takes a tid)
    except OSError as exc:  # a seccomp filter (the shipped unit allows it) or an odd kernel
        log.info("spool writer: SCHED_BATCH refused (%s); the writer runs under the default"
                 " policy, at ~15%% more CPU per message", exc)


def _settle(items: list[_Settlement]) -> None:
    for future, value, exc in items:
        if future.done():  # the caller was cancelled; the write itself stands
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)


class Writer:
    """Owns the write connection and the thread that batches operations onto it."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        name: str = "spool-writer",
        hooks: CommitHooks | None = None,
        gather: float = GATHER_SECONDS,
        bulk: BulkRunner | None = None,
    ) -> None:
        """`gather`: when the queue held more than one operation (others are writing at the
        same time) and is empty now, wait this long once for more before the transaction: a
        commit then carries about twice the operations (half the fsyncs and WAL pages per
        message). A lone operation never waits. 0 turns it off.
        `bulk`: runs the bulk forms of consecutive operations that have one, in a few
        statements for all of them; `op` is what runs when the batch is run again one
        operation at a time."""
        self._conn = conn
        self._bulk = bulk
        self._gather = gather
        self._hooks: CommitHooks = hooks if hooks is not None else _NoHooks()
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self.stats = WriterStats()
        self.health = SpoolHealth()  # "full" from a failed write to the next commit

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: Operation, *, size: int = 0, bulk: Any = None) -> asyncio.Future[Any]:
        """Queue op (called on the writer thread with the connection, inside a transaction);
        the returned future resolves once its transaction has committed. `bulk`: the same
        change in the form the bulk runner takes (then the result is None)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._stopping:
            future.set_exception(SpoolError(reason="spool is closed"))
            return future
        self._queue.put(_Job(op, loop, future, size, bulk if self._bulk is not None else None))
        return future

    async def stop(self) -> None:
        """Run everything already queued, then stop the thread and close the connection."""
        if self._stopping:
            return
        self._stopping = True
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # --- writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        batch_scheduling()
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[_Job] = []
            size = 0
            item = first
            gathered = False
            while True:
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Job)
                batch.append(item)
                size += item.size
                if len(batch) >= MAX_BATCH_OPS or size >= MAX_BATCH_BYTES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    if gathered or len(batch) < 2 or self._gather <= 0:
                        break
                    gathered = True
                    time.sleep(self._gather)
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
            if batch:
                try:
                    self._run_batch(batch)
                except BaseException as exc:  # a bug must not kill the thread silently
                    log.exception("spool writer: unexpected failure in a batch")
                    self._fail(batch, to_spool_error(exc))
        # Anything queued after the stop marker was submitted too late.
        late: list[_Job] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                late.append(item)
        self._fail(late, SpoolError(reason="spool is closed"))
        try:
            self._conn.close()
        except sqlite3.Error as exc:
            log.warning("spool writer: closing the database failed: %s", exc)

    def _run_batch(self, batch: list[_Job]) -> None:
        """One transaction for the batch, its operations one after the other, except that
        consecutive ones with a bulk form run together (relay/spool/bulk.py). One that
        fails having changed nothing (its failed statement undid itself, as SQLite
        statements do) fails alone. One that fails after changing rows, a failed bulk run,
        or a lost transaction has the batch undone and run again with each operation in
        its own SAVEPOINT, so that its failure stays with it. Nothing fails on the common
        path: two statements per operation saved there."""
        if not self._begin(batch):
            return
        conn = self._conn
        settled: list[tuple[_Job, Any, BaseException | None]] = []
        run: list[_Job] = []
        for job in batch:
            if job.bulk is not None:
                run.append(job)
                continue
            if run and not self._run_bulk(run, settled):
                self._again(batch)
                return
            run = []
            before = conn.total_changes
            try:
                value = job.op(conn)
            except Exception as exc:
                if conn.in_transaction and conn.total_changes == before:
                    settled.append((job, None, _failure(exc)))
                    continue
                self._again(batch)
                return
            settled.append((job, value, None))
        if run and not self._run_bulk(run, settled):
            self._again(batch)
            return
        self._commit(batch, settled)

    def _run_bulk(self, run: list[_Job], settled: list[tuple[_Job, Any, BaseException | None]]
                  ) -> bool:
        """The run's bulk forms together; False when they failed (the batch is redone)."""
        assert self._bulk is not None
        try:
            self._bulk(self._conn, [job.bulk for job in run])
        except Exception:
            return False
        settled.extend((job, None, None) for job in run)
        return True

    def _again(self, batch: list[_Job]) -> None:
        """Undo the batch and run it again, each operation in its own SAVEPOINT."""
        self._rollback()
        self._hooks.after_failure()
        if self._begin(batch):
            again = self._each_in_savepoint(batch)
            if again is not None:
                self._commit(batch, again)

    def _begin(self, batch: list[_Job]) -> bool:
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._fail(batch, to_spool_error(exc))
            return False
        return True

    def _each_in_savepoint(
        self, batch: list[_Job]
    ) -> list[tuple[_Job, Any, BaseException | None]] | None:
        """Run each operation in its own SAVEPOINT: one that fails is rolled back alone and
        settles with its error. None when the whole transaction was lost (then every
        operation has been failed)."""
        conn = self._conn
        settled: list[tuple[_Job, Any, BaseException | None]] = []
        for job in batch:
            try:
                conn.execute("SAVEPOINT op")
                value = job.op(conn)
                conn.execute("RELEASE op")
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back itself (SQLITE_IOERR,
                    # SQLITE_FULL, ...): every operation in the batch is lost, fail them all.
                    self._fail(batch, to_spool_error(exc))
                    return None
                try:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                except sqlite3.Error as exc2:
                    self._rollback()
                    self._fail(batch, to_spool_error(exc2))
                    return None
                settled.append((job, None, _failure(exc)))
            else:
                settled.append((job, value, None))
        return settled

    def _commit(
        self, batch: list[_Job], settled: list[tuple[_Job, Any, BaseException | None]]
    ) -> None:
        conn = self._conn
        try:
            self._hooks.before_commit(conn)
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._rollback()
            self._fail(batch, to_spool_error(exc))
            return
        self._hooks.after_commit()
        self.health.committed()
        self.stats.commits += 1
        self.stats.operations += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self._resolve([(job.loop, (job.future, value, exc)) for job, value, exc in settled])

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("spool writer: rollback failed: %s", exc)

    def _fail(self, jobs: list[_Job], exc: SpoolError) -> None:
        self._hooks.after_failure()
        if not jobs:
            return
        self.stats.failed_batches += 1
        if is_full(exc):  # one rate-limited warning, not one per batch (relay/spool/health.py)
            self.health.full(str(exc.__cause__ or exc.reason), len(jobs))
        else:
            log.warning("spool writer: %d operation(s) failed: %s", len(jobs), exc.reason)
        self._resolve([(job.loop, (job.future, None, _copy(exc))) for job in jobs])

    @staticmethod
    def _resolve(items: list[tuple[asyncio.AbstractEventLoop, _Settlement]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Settlement]] = {}
        for loop, settlement in items:
            by_loop.setdefault(loop, []).append(settlement)
        for loop, settlements in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settlements)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass
