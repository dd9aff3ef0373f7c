"""The Spool: the relay's durable store of accepted messages and their per-recipient state."""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.core.errors import SpoolError
from relay.spool import recovery
from relay.spool.bulk import Bulk, Put, Update
from relay.spool.eventlog import EventLog, insert
from relay.spool.queue_id import new_queue_id
from relay.spool.recovery import DueBatch
from relay.spool.schema import (
    DB_NAME,
    MESSAGE_COLUMNS,
    DamagedRow,
    connect,
    decode_message,
    encode_recipients,
    init_schema,
)
from relay.spool.segments import MissingBody, Segments, fsync_dir
from relay.spool.types import (
    EventRow,
    RcptStatus,
    RecipientUpdate,
    SpoolMessage,
    SpoolRecipient,
    StoredBody,
)
from relay.spool.writer import GATHER_SECONDS, Writer, WriterStats

log = logging.getLogger("relay.spool")

T = TypeVar("T")
LOCK_NAME = "spool.lock"
# Bodies of committed messages kept in memory for their first delivery attempt (oldest
# dropped first past this size): the scheduler then gets the very bytes object the listener
# received, without a thread hop, an SQLite read and a copy per message.
BODY_CACHE_BYTES = 32 * 1024 * 1024
# Bodies are appended to body segments (relay/spool/segments.py): written once, where SQLite
# writes a BLOB twice (WAL, then checkpoint) and frees its overflow pages again on delete.
# Bodies up to INLINE_MAX bytes would stay BLOBs: none, since segments won at every size
# measured, 5 KB included (relay/spool/__init__.py); tests and benchmarks set it to make
# BLOB rows, the form of spools written before segments.
INLINE_MAX = 0


def _open_database(db_path: Path, max_bytes: int | None) -> sqlite3.Connection:
    """The write connection, schema ready. A file that is not a healthy database is moved
    aside (and reported) so the relay starts with an empty spool rather than not at all."""
    try:
        conn = connect(db_path)
        try:
            init_schema(conn)
        except BaseException:
            conn.close()
            raise
    except sqlite3.DatabaseError as exc:
        if not recovery.is_damage(exc):
            raise
        target = recovery.move_aside(db_path)
        log.error(
            "spool database %s cannot be opened (%s); moved aside to %s, starting empty. "
            "Recover its messages with `sqlite3 %s .recover`",
            db_path,
            exc,
            target,
            target,
        )
        conn = connect(db_path)
        init_schema(conn)
    if max_bytes is not None:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={max(1, max_bytes // page_size)}")
    # The database and WAL files now exist: make their directory entries durable too.
    fsync_dir(db_path.parent)
    return conn


def _filters(
    org: str | None, account: str | None, upstream: str | None, older_than: float | None
) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or empty) and arguments of list/ids."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("org", org), ("account", account), ("upstream", upstream)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if older_than is not None:
        where.append("received_at < ?")
        args.append(older_than)
    return (" WHERE " + " AND ".join(where) if where else ""), args


def lock_file(path: Path, busy: str) -> int:
    """Hold `path` locked (flock) with our pid inside, or raise SpoolError(`busy`). The
    kernel releases the lock when the process dies, even by SIGKILL."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolError(reason=busy) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def lock_directory(directory: Path) -> int:
    """One process per spool: two relays delivering from one queue would send everything
    twice."""
    return lock_file(directory / LOCK_NAME, f"spool {directory} is in use by another process")


def _delete_row(
    conn: sqlite3.Connection, segments: Segments, rowid: int, seg: int | None, size: int
) -> None:
    """Delete a message row and its body (a BLOB row, or its place in a segment); the last
    step of an operation."""
    conn.execute("DELETE FROM messages WHERE id = ?", (rowid,))
    if seg is None:
        conn.execute("DELETE FROM bodies WHERE id = ?", (rowid,))
    else:
        segments.released(seg, size)


class Spool:
    """Durable queue on SQLite (WAL, synchronous=FULL) with one group-committing writer.

    Writes (put, update, set_held, delete) go through the writer thread and resolve after
    COMMIT. `update` is durable once awaited too; a caller that fires it and forgets risks
    only losing the newest recipient state on a crash, which re-delivers (a duplicate),
    never loses mail. Reads use a separate connection off the event loop, except a body
    still in the bounded in-memory cache of committed bodies (dropped at the message's first
    update or delete), which `read_body` returns as is.
    """

    def __init__(
        self,
        directory: Path,
        writer: Writer,
        reader: sqlite3.Connection,
        inspector: sqlite3.Connection,
        lock_fd: int,
        segments: Segments,
        bulk: Bulk,
        *,
        body_cache_bytes: int = BODY_CACHE_BYTES,
        inline_max: int = INLINE_MAX,
        max_bytes: int | None = None,
    ) -> None:
        self.directory = directory
        self.db_path = directory / DB_NAME
        self._writer = writer
        # Two read connections, each used by one thread at a time: `_reader` for the mail
        # path (bodies to deliver, the scheduler's refills), `_inspector` for everything an
        # operator, a metrics scrape, the status page or the webhooks ask. A summary over a
        # million queued messages takes ~0.3 s; on one shared connection each status-page
        # refresh or scrape held every delivery's body read up that long.
        self._reader = reader
        self._reader_lock = threading.Lock()
        self._inspector = inspector
        self._inspector_lock = threading.Lock()
        self._lock_fd = lock_fd
        self._segments = segments
        self._bulk = bulk  # puts and outcomes, alone or a batch's run of them together
        self._inline_max = inline_max
        self._max_bytes = max_bytes
        self._closed = False
        # Committed bodies (and whether each is wire-ready); insertion order = eviction order.
        self._bodies: dict[str, StoredBody] = {}
        self._body_bytes = 0
        self._body_cache_bytes = body_cache_bytes
        self.events = EventLog(self._write, self._inspect)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        body_cache_bytes: int = BODY_CACHE_BYTES,
        inline_max: int = INLINE_MAX,
        commit_gather: float = GATHER_SECONDS,
    ) -> Spool:
        """Open (creating if needed) the spool in directory `path`.

        max_bytes caps the spool's size (database and body segments): past it `put` fails
        with SpoolError (451), so a full queue answers "try later" instead of filling the
        disk. body_cache_bytes bounds the in-memory copy of recently committed bodies (0
        disables it). Bodies larger than inline_max bytes go to body segments.
        commit_gather: how long a busy writer waits for more operations (writer.Writer).
        """
        directory = Path(path)

        def blocking() -> Spool:
            try:
                directory.mkdir(parents=True, exist_ok=True)
                lock_fd = lock_directory(directory)
            except OSError as exc:
                raise SpoolError(reason=f"cannot open spool {directory}: {exc}") from exc
            segments = Segments(directory)
            try:
                conn = _open_database(directory / DB_NAME, max_bytes)
                missing = segments.open(conn)
                if missing:  # rows whose body is gone: set aside, never delivered empty
                    recovery.quarantine(conn, missing, segments)
                reader = connect(directory / DB_NAME, readonly=True)
                inspector = connect(directory / DB_NAME, readonly=True)
            except (sqlite3.Error, OSError) as exc:
                os.close(lock_fd)
                raise SpoolError(reason=f"cannot open spool {directory}: {exc}") from exc
            bulk = Bulk(segments, max_bytes)
            writer = Writer(conn, hooks=segments, gather=commit_gather, bulk=bulk)
            writer.start()
            return cls(
                directory,
                writer,
                reader,
                inspector,
                lock_fd,
                segments,
                bulk,
                body_cache_bytes=body_cache_bytes,
                inline_max=inline_max,
                max_bytes=max_bytes,
            )

        return await asyncio.to_thread(blocking)

    @property
    def stats(self) -> WriterStats:
        return self._writer.stats

    @property
    def full(self) -> str | None:
        """Why the spool cannot take mail now (no space left), or None."""
        return self._writer.health.reason

    # --- writes (writer thread, group commit) -----------------------------------------------

    async def put(
        self,
        *,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        client: str,
        org: str,
        account: str,
        upstream: str,
        is_dsn: bool = False,
        received_at: float | None = None,
        queue_id: str | None = None,
        events: Sequence[EventRow] = (),
        dsn: str | None = None,
        wire: bool = False,
    ) -> str:
        """Store a message; returns its new queue id once it is committed and fsynced.
        Raises SpoolError when it could not be made durable (then nothing of it is kept).
        `wire`: the caller vouches that `data` is wire-ready (CRLF lines only, none starting
        with ".", ending with CRLF), so delivery sends it as is.

        If the caller is cancelled while waiting, the message may still be committed (the
        client then sees no 250 and retries: a duplicate, never a loss). `events` are
        written in the same transaction (their queue id is `queue_id`, given by the caller)."""
        if not recipients:
            raise ValueError("a message needs at least one recipient")
        if self._closed:
            raise SpoolError(reason="spool is closed")
        queue_id = queue_id or new_queue_id()
        rcpts = [SpoolRecipient(rcpt=r, status=RcptStatus.PENDING) for r in recipients]
        row = (
            queue_id,
            time.time() if received_at is None else received_at,
            sender,
            client,
            org,
            account,
            upstream,
            len(data),
            0,
            int(is_dsn),
            len(rcpts),
            encode_recipients(rcpts),
            dsn,
            int(wire),
        )
        item: Put | None = None
        if len(data) > self._inline_max:  # the body goes to a segment: relay/spool/bulk.py
            item, run = Put(row, data, events), self._bulk

            def op(conn: sqlite3.Connection) -> None:
                run(conn, [item])
        else:  # a BLOB row, the form of spools before segments (tests and benchmarks)

            def op(conn: sqlite3.Connection) -> None:
                cur = conn.execute(
                    "INSERT INTO messages (queue_id, received_at, sender, client, org, account,"
                    " upstream, size, held, is_dsn, pending, recipients, dsn, wire)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    row,
                )
                conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (cur.lastrowid, data))
                insert(conn, events)

        try:
            await self._writer.submit(op, size=len(data), bulk=item)
        except SpoolError:
            raise
        except Exception as exc:  # the listener must only ever see SpoolError (451)
            raise SpoolError(reason=f"spool put failed: {exc!r}") from exc
        # Only after COMMIT: a body is never readable from memory unless it is on disk.
        self._cache_body(queue_id, StoredBody(data, wire))
        return queue_id

    def _cache_body(self, queue_id: str, body: StoredBody) -> None:
        if len(body.data) > self._body_cache_bytes:
            return
        self._bodies[queue_id] = body
        self._body_bytes += len(body.data)
        while self._body_bytes > self._body_cache_bytes:
            oldest = next(iter(self._bodies))
            self._body_bytes -= len(self._bodies.pop(oldest).data)

    def drop_cached_body(self, queue_id: str) -> None:
        """Forget the in-memory copy of a body (the scheduler set the message aside: its
        attempt is not near, and a retry reads the body from disk anyway)."""
        self._forget_body(queue_id)

    def _forget_body(self, queue_id: str) -> None:
        body = self._bodies.pop(queue_id, None)
        if body is not None:
            self._body_bytes -= len(body.data)

    async def update(
        self,
        queue_id: str,
        updates: Sequence[RecipientUpdate],
        *,
        upstream: str | None = None,
        events: Sequence[EventRow] = (),
    ) -> None:
        """Record delivery outcomes (and optionally a re-routed upstream). When no recipient
        remains PENDING the message and its body are deleted. Unknown ids are ignored (an
        operator may have deleted the message meanwhile)."""
        # After an attempt the body has served its purpose; a retry reads it from disk.
        self._forget_body(queue_id)
        if self._closed:
            raise SpoolError(reason="spool is closed")
        item = Update(queue_id, {u.rcpt: u for u in updates}, upstream, events)
        run = self._bulk
        await self._writer.submit(lambda conn: run(conn, [item]), bulk=item)

    async def set_held(
        self,
        queue_id: str,
        *,
        held: bool,
        due: float | None = None,
        events: Sequence[EventRow] = (),
    ) -> bool:
        """Hold (no delivery attempts) or release a message, optionally setting its `due`
        time too (a release makes it due now); False if the id is unknown."""

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE messages SET due = CASE WHEN held THEN coalesce(?, due) ELSE due END,"
                " held = ? WHERE queue_id = ?",
                (due, int(held), queue_id),
            )
            if cur.rowcount > 0:
                insert(conn, events)
            return cur.rowcount > 0

        return bool(await self._write(op))

    async def set_due(
        self,
        queue_ids: Sequence[str],
        due: float,
        events: Callable[[str, str, str, str], Sequence[EventRow]] | None = None,
    ) -> dict[str, str]:
        """Make these messages due at `due` for the scheduler (an operator's retry: now),
        unless held; recipients' own next_attempt is unchanged. Returns each id's result:
        "ok", "held" or "missing". `events(queue_id, org, account, sender)` gives the events
        of each message made due, written in the same transaction."""
        ids = list(queue_ids)

        def op(conn: sqlite3.Connection) -> dict[str, str]:
            out = {}
            for qid in ids:
                row = conn.execute(
                    "SELECT held, org, account, sender FROM messages WHERE queue_id = ?", (qid,)
                ).fetchone()
                if row is None:
                    out[qid] = "missing"
                elif row[0]:
                    out[qid] = "held"
                else:
                    conn.execute("UPDATE messages SET due = ? WHERE queue_id = ?", (due, qid))
                    if events is not None:
                        insert(conn, events(qid, row[1], row[2], row[3]))
                    out[qid] = "ok"
            return out

        result: dict[str, str] = await self._write(op)
        return result

    async def delete(self, queue_id: str, *, events: Sequence[EventRow] = ()) -> bool:
        """Remove a message and its body; False if the id is unknown."""
        self._forget_body(queue_id)
        segments = self._segments

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT id, body_seg, size FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                return False
            insert(conn, events)
            _delete_row(conn, segments, *row)
            return True

        return bool(await self._write(op))

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise SpoolError(reason="spool is closed")
        result: T = await self._writer.submit(op)
        return result

    # --- reads (separate WAL reader connection, off the event loop) ----------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read on the mail path (bodies to deliver, the scheduler's refills)."""
        return await self._on(self._reader, self._reader_lock, fn)

    async def _inspect(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A read for an operator, a scrape, the status page or the events (not the mail
        path: see `_reader`)."""
        return await self._on(self._inspector, self._inspector_lock, fn)

    async def _on(
        self, conn: sqlite3.Connection, lock: threading.Lock, fn: Callable[[sqlite3.Connection], T]
    ) -> T:
        if self._closed:
            raise SpoolError(reason="spool is closed")

        def blocking() -> T:
            with lock:
                return fn(conn)

        return await asyncio.to_thread(blocking)

    async def read_body(self, queue_id: str) -> bytes:
        """The message bytes as received; KeyError if the id is unknown."""
        return (await self.body(queue_id)).data

    async def body(self, queue_id: str) -> StoredBody:
        """The message bytes as received, and whether they are wire-ready; KeyError if the
        id is unknown, SpoolError if its body is missing from its segment."""
        if self._closed:
            raise SpoolError(reason="spool is closed")
        cached = self._bodies.get(queue_id)
        if cached is not None:
            return cached
        segments = self._segments

        def fn(conn: sqlite3.Connection) -> StoredBody | None:
            row = conn.execute(
                "SELECT m.body_seg, m.body_off, m.size, m.wire, b.data FROM messages AS m"
                " LEFT JOIN bodies AS b ON b.id = m.id WHERE m.queue_id = ?",
                (queue_id,),
            ).fetchone()
            if row is None:
                return None
            seg, off, size, wire, blob = row
            if seg is None:
                if blob is None:
                    raise MissingBody(f"message {queue_id} has no body")
                return StoredBody(bytes(blob), bool(wire))
            return StoredBody(segments.read(seg, off, size), bool(wire))

        try:
            body = await self._read(fn)
        except MissingBody as exc:
            raise SpoolError(reason=f"spool: {exc}") from exc
        if body is None:
            raise KeyError(queue_id)
        return body

    async def get(self, queue_id: str) -> SpoolMessage | None:
        """The message's metadata, or None if unknown. SpoolError if its row is damaged."""

        def fn(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            row: tuple[Any, ...] | None = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            return row

        row = await self._inspect(fn)
        if row is None:
            return None
        try:
            return decode_message(row)
        except DamagedRow as exc:
            raise SpoolError(reason=f"spool row {queue_id} is damaged: {exc}") from exc

    async def ids(
        self,
        *,
        org: str | None = None,
        account: str | None = None,
        upstream: str | None = None,
        older_than: float | None = None,
    ) -> list[str]:
        """The queue ids of every queued message matching every given filter, oldest first
        (no limit: bulk operator actions)."""
        where, args = _filters(org, account, upstream, older_than)
        sql = "SELECT queue_id FROM messages" + where + " ORDER BY received_at, id"

        def fn(conn: sqlite3.Connection) -> list[str]:
            return [str(r[0]) for r in conn.execute(sql, args)]

        return await self._inspect(fn)

    async def list(
        self,
        *,
        org: str | None = None,
        account: str | None = None,
        upstream: str | None = None,
        older_than: float | None = None,
        limit: int = 1000,
    ) -> list[SpoolMessage]:
        """Queued messages matching every given filter, oldest first (at most `limit`).
        older_than is a unix time: messages received before it."""
        where, args = _filters(org, account, upstream, older_than)
        sql = f"SELECT {MESSAGE_COLUMNS} FROM messages{where} ORDER BY received_at, id LIMIT ?"
        args.append(max(0, limit))

        def fn(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, args).fetchall()

        out: list[SpoolMessage] = []
        for row in await self._inspect(fn):
            try:
                out.append(decode_message(row))
            except DamagedRow as exc:
                log.warning("spool: skipping damaged row %r in list: %s", row[0], exc)
        return out

    async def summary(self) -> dict[str, Any]:
        """Counts of queued messages, pending recipients, held messages and the oldest
        received_at, in total and grouped by upstream and by org: the counts kept by the
        spool's triggers (schema step `queue-counts`), each group's oldest by one index seek.
        Its cost grows with the number of groups, not of messages."""

        def fn(conn: sqlite3.Connection) -> tuple[list[Any], list[Any]]:
            return _kept_groups(conn, "upstream"), _kept_groups(conn, "org")

        by_upstream_rows, by_org_rows = await self._inspect(fn)

        def group(rows: list[Any]) -> dict[str, dict[str, Any]]:
            return {
                str(name): {
                    "messages": int(count),
                    "recipients_pending": int(pending),
                    "held": int(held),
                    "oldest_received_at": oldest,
                }
                for name, count, pending, held, oldest in rows
            }

        by_upstream = group(by_upstream_rows)
        oldest = [g["oldest_received_at"] for g in by_upstream.values()
                  if g["oldest_received_at"] is not None]
        return {
            "messages": sum(g["messages"] for g in by_upstream.values()),
            "recipients_pending": sum(g["recipients_pending"] for g in by_upstream.values()),
            "held": sum(g["held"] for g in by_upstream.values()),
            "oldest_received_at": min(oldest) if oldest else None,
            "by_upstream": by_upstream,
            "by_org": group(by_org_rows),
        }

    async def due(self, after: tuple[float, str] | None, limit: int) -> DueBatch:
        """Up to `limit` deliverable (not held) messages in (due, queue_id) order from `after`
        on (inclusive), each with its `due`: the scheduler's refill of its in-memory set.
        Damaged rows are moved to quarantine (reported), not returned."""
        batch = await self._read(lambda conn: recovery.read_due(conn, after, max(1, limit)))
        if batch.damaged:
            segments = self._segments
            try:
                await self._write(
                    lambda conn: recovery.move_to_quarantine(
                        conn, batch.damaged, segments=segments
                    )
                )
            except SpoolError as exc:
                log.error(
                    "spool: could not quarantine %d damaged row(s): %s", len(batch.damaged), exc
                )
        return batch

    async def age_shape(
        self, *, by: str, edges: Sequence[float], now: float
    ) -> dict[str, builtins.list[int]]:
        """Queued messages per `by` group ("upstream" or "org") and age bucket: bucket i
        counts ages below edges[i] (and at least edges[i-1]); the last, everything older.
        Counted by SQLite from a covering index, without building a row per message."""
        if by not in ("upstream", "org"):
            raise ValueError(f"age_shape by {by!r}: want upstream or org")
        cases = " ".join(f"WHEN ? - received_at < ? THEN {i}" for i in range(len(edges)))
        sql = (
            f"SELECT {by}, CASE {cases} ELSE {len(edges)} END AS bucket, count(*)"
            f" FROM messages INDEXED BY messages_{by} GROUP BY {by}, bucket"
        )
        params = [x for edge in edges for x in (now, edge)]

        def fn(conn: sqlite3.Connection) -> builtins.list[Any]:
            return conn.execute(sql, params).fetchall()

        out: dict[str, builtins.list[int]] = {}
        for name, bucket, n in await self._inspect(fn):
            out.setdefault(str(name), [0] * (len(edges) + 1))[int(bucket)] += int(n)
        return out

    async def count(self) -> tuple[int, int]:
        """(queued messages, of which held): the whole queue, from the kept counts."""

        def fn(conn: sqlite3.Connection) -> tuple[int, int]:
            n, held = conn.execute(
                "SELECT total(messages), total(held) FROM queue_counts WHERE kind = 'upstream'"
            ).fetchone()
            return int(n), int(held)

        return await self._inspect(fn)

    async def depth(self) -> dict[str, tuple[int, float]]:
        """(messages, oldest received_at) by upstream, for the queue gauges: the kept counts
        and one index seek per upstream."""
        rows = await self._inspect(lambda conn: _kept_groups(conn, "upstream"))
        return {str(u): (int(n), float(oldest)) for u, n, _, _, oldest in rows
                if oldest is not None}

    def iter_pending(self) -> Iterator[SpoolMessage]:
        """Startup recovery: every message with a PENDING recipient, streamed page by page
        (synchronous: it runs before the relay serves). Damaged rows are quarantined."""
        if self._closed:
            raise SpoolError(reason="spool is closed")
        return recovery.scan_pending(self.db_path, self._segments)

    async def close(self) -> None:
        """Commit everything already queued, stop the writer thread, release the spool."""
        if self._closed:
            return
        self._closed = True
        await self._writer.stop()
        self._segments.close()
        with self._reader_lock:
            self._reader.close()
        with self._inspector_lock:
            self._inspector.close()
        os.close(self._lock_fd)


def _kept_groups(conn: sqlite3.Connection, kind: str) -> list[tuple[str, int, int, int, Any]]:
    """(name, messages, pending recipients, held, oldest received_at) of each `kind` group
    ("upstream" or "org") with queued mail: the counts the triggers keep (schema step
    `queue-counts`) and one index seek per group for its oldest message."""
    out = []
    for name, count, pending, held in conn.execute(
        "SELECT name, messages, pending, held FROM queue_counts WHERE kind = ? AND messages > 0"
        " ORDER BY name",
        (kind,),
    ).fetchall():
        oldest = conn.execute(
            f"SELECT min(received_at) FROM messages INDEXED BY messages_{kind} WHERE {kind} = ?",
            (name,),
        ).fetchone()[0]
        out.append((name, count, pending, held, oldest))
    return out
