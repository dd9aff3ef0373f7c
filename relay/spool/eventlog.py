"""The spool's event log: events written with the state change they report, read back in
`seq` order by the webhook outboxes, searched by the trace, pruned by age and count.

Writes that come with a state change go through `Spool.put/update/set_held/delete/set_due`
(`insert` runs inside their operation, so both commit or neither does). The rest is here:
events that report no stored change (a refused RCPT), the endpoints' cursors, reads, pruning.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from relay.spool.types import EventRow

T = TypeVar("T")

COLUMNS = "seq, id, ts, type, queue_id, message_id, org, recipient, data"


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as read back: its shard-local sequence number and its row."""

    seq: int
    row: EventRow


def insert(conn: sqlite3.Connection, rows: Sequence[EventRow]) -> None:
    """Inside a writer operation: append `rows` (same transaction as the caller's change)."""
    if rows:
        conn.executemany(
            "INSERT INTO events (id, ts, type, queue_id, message_id, org, recipient, data)"
            " VALUES (?,?,?,?,?,?,?,?)",
            [(r.id, r.ts, r.type, r.queue_id, r.message_id, r.org, r.recipient, r.data)
             for r in rows],
        )


def _decode(row: Sequence[Any]) -> StoredEvent:
    seq, eid, ts, typ, qid, mid, org, rcpt, data = row
    return StoredEvent(int(seq), EventRow(str(eid), float(ts), str(typ), str(qid), str(mid),
                                          str(org), str(rcpt), str(data)))


Reader = Callable[[Callable[[sqlite3.Connection], Any]], Awaitable[Any]]


class EventLog:
    """The event operations of one spool (its writer and reader, passed in by `Spool`)."""

    def __init__(self, write: Reader, read: Reader) -> None:
        self._write = write
        self._read = read

    async def add(self, rows: Sequence[EventRow]) -> None:
        """Events that report no stored change of their own (durable once awaited)."""
        if rows:
            await self._write(lambda conn: insert(conn, rows))

    async def after(self, seq: int, limit: int, *, types: Sequence[str] | None = None,
                    org: str | None = None) -> list[StoredEvent]:
        """Matching events with a seq above `seq`, in seq order (at most `limit`)."""
        where, args = self._where(seq, types, org)
        sql = f"SELECT {COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT ?"
        args.append(max(1, limit))

        def fn(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [_decode(r) for r in conn.execute(sql, args)]

        result: list[StoredEvent] = await self._read(fn)
        return result

    async def seq_of(self, event_id: str) -> int | None:
        def fn(conn: sqlite3.Connection) -> int | None:
            row = conn.execute("SELECT seq FROM events WHERE id = ?", (event_id,)).fetchone()
            return None if row is None else int(row[0])

        result: int | None = await self._read(fn)
        return result

    async def seq_at(self, ts: float) -> int:
        """The seq just before the first event at or after `ts` (a replay's start)."""

        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT min(seq) FROM events WHERE ts >= ?", (ts,)).fetchone()
            if row[0] is not None:
                return int(row[0]) - 1
            last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
            return int(last or 0)

        result: int = await self._read(fn)
        return result

    async def find(self, *, queue_ids: Sequence[str] = (), message_id: str | None = None,
                   recipient: str | None = None, since: float | None = None,
                   limit: int = 1000) -> list[StoredEvent]:
        """The trace's search: events of these queue ids, this Message-ID or recipient."""
        clauses: list[str] = []
        args: list[Any] = []
        if queue_ids:
            clauses.append(f"queue_id IN ({','.join('?' * len(queue_ids))})")
            args.extend(queue_ids)
        if message_id is not None:
            clauses.append("(message_id = ? AND message_id != '')")
            args.append(message_id)
        if recipient is not None:
            clauses.append("(recipient = ? AND recipient != '')")
            args.append(recipient)
        if not clauses:
            return []
        sql = f"SELECT {COLUMNS} FROM events WHERE ({' OR '.join(clauses)})"
        if since is not None:
            sql += " AND ts >= ?"
            args.append(since)
        sql += " ORDER BY seq LIMIT ?"
        args.append(max(1, limit))

        def fn(conn: sqlite3.Connection) -> list[StoredEvent]:
            return [_decode(r) for r in conn.execute(sql, args)]

        result: list[StoredEvent] = await self._read(fn)
        return result

    async def stats(self) -> tuple[int, int, float | None]:
        """(last seq, events kept, oldest ts)."""

        def fn(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            n, oldest = conn.execute("SELECT count(*), min(ts) FROM events").fetchone()
            return (int(last[0]) if last else 0), int(n), oldest

        result: tuple[int, int, float | None] = await self._read(fn)
        return result

    @staticmethod
    def _where(seq: int, types: Sequence[str] | None, org: str | None,
               upto: int | None = None) -> tuple[str, list[Any]]:
        where = ["seq > ?"]
        args: list[Any] = [seq]
        if upto is not None:
            where.append("seq <= ?")
            args.append(upto)
        if types:
            where.append(f"type IN ({','.join('?' * len(types))})")
            args.extend(types)
        if org is not None:
            where.append("org = ?")
            args.append(org)
        return " AND ".join(where), args

    async def count_after(self, seq: int, *, types: Sequence[str] | None = None,
                          org: str | None = None, upto: int | None = None,
                          ) -> tuple[int, float | None]:
        """(events above `seq` (up to `upto`) matching, the oldest one's ts): an outbox."""
        where, args = self._where(seq, types, org, upto)
        sql = f"SELECT count(*), min(ts) FROM events WHERE {where}"

        def fn(conn: sqlite3.Connection) -> tuple[int, float | None]:
            n, oldest = conn.execute(sql, args).fetchone()
            return int(n), oldest

        result: tuple[int, float | None] = await self._read(fn)
        return result

    async def nth_after(self, seq: int, n: int, *, types: Sequence[str] | None = None,
                        org: str | None = None) -> int:
        """The seq of the n-th matching event above `seq` (the last one if fewer)."""
        where, args = self._where(seq, types, org)
        sql = f"SELECT seq FROM events WHERE {where} ORDER BY seq LIMIT 1 OFFSET ?"
        args.append(max(0, n - 1))

        def fn(conn: sqlite3.Connection) -> int:
            row = conn.execute(sql, args).fetchone()
            if row is None:
                last = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
                return int(last or seq)
            return int(row[0])

        result: int = await self._read(fn)
        return result

    # -- cursors ------------------------------------------------------------------------
    async def cursors(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            return {str(e): int(s) for e, s in conn.execute(
                "SELECT endpoint, acked FROM webhook_cursors")}

        result: dict[str, int] = await self._read(fn)
        return result

    async def set_cursor(self, endpoint: str, acked: int) -> None:
        """Endpoint `endpoint` has every event up to `acked` (durable once awaited)."""
        now = time.time()
        await self._write(lambda conn: conn.execute(
            "INSERT INTO webhook_cursors (endpoint, acked, updated_at) VALUES (?,?,?)"
            " ON CONFLICT (endpoint) DO UPDATE SET acked = excluded.acked,"
            " updated_at = excluded.updated_at", (endpoint, acked, now)))

    async def prune(self, before: float, keep_max: int, protect_from: int | None) -> int:
        """Delete events older than `before`, and the oldest beyond `keep_max`; never those
        above `protect_from` (still in some outbox) unless over `keep_max`. Returns how
        many went."""

        def fn(conn: sqlite3.Connection) -> int:
            limit = protect_from if protect_from is not None else -1
            cur = conn.execute(
                "DELETE FROM events WHERE ts < ? AND (? < 0 OR seq <= ?)", (before, limit, limit))
            n = cur.rowcount
            total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            if total > keep_max:
                cut = conn.execute("SELECT seq FROM events ORDER BY seq LIMIT 1 OFFSET ?",
                                   (total - keep_max,)).fetchone()
                if cut is not None:
                    n += conn.execute("DELETE FROM events WHERE seq < ?", (cut[0],)).rowcount
            return int(n)

        result: int = await self._write(fn)
        return result
