"""Puts and delivery outcomes of one batch in a few statements instead of a few per message.

The writer thread releases the GIL around every SQLite step and every write to a body
segment, and takes it back afterwards. With the event loop busy, each of those takes is a
hand-over between the two threads: a futex wake on one side, a wait and a context switch on
the other. At 5 KB that was ~14% of a worker's CPU (`perf`, benchmarks/RESULTS.md §16),
with about seven steps per message: the put's INSERT and its event, the outcome's SELECT
(two steps), its event and the DELETE, and the body's `pwrite`.

Here a run of consecutive puts and outcomes in a batch costs a handful of steps whatever
its length: one `pwritev` for the bodies, one multi-row INSERT per table (in chunks of
powers of two, so that a few statement texts cover every length and stay in the
connection's statement cache), one SELECT that returns every outcome's row as one JSON
array, and one DELETE. The rows, the events and their order are exactly what the
operations would have written one by one (`Spool.put`, `Spool.update`): when any statement
here fails, the writer rolls the batch back and runs each operation alone, so a failure
still stays with its own operation (relay/spool/writer.py).
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from relay.core.errors import SpoolError
from relay.spool.schema import DamagedRow, decode_recipients, due_of, encode_recipients
from relay.spool.segments import Segments
from relay.spool.types import EventRow, RcptStatus, RecipientUpdate, SpoolRecipient

PUT_COLUMNS = (
    "queue_id, received_at, sender, client, org, account, upstream, size, held, is_dsn,"
    " pending, recipients, dsn, wire, body_seg, body_off"
)
EVENT_COLUMNS = "id, ts, type, queue_id, message_id, org, recipient, data"


@dataclass(slots=True)
class Put:
    """A message to store: its row (the columns of `PUT_COLUMNS` but the body's place),
    its body (appended to a segment) and its events."""

    row: tuple[Any, ...]
    data: bytes
    events: Sequence[EventRow] = ()


@dataclass(slots=True)
class Update:
    """Recipient states after an attempt (Spool.update): the message goes when none is
    pending; an unknown queue id is ignored, its events too."""

    queue_id: str
    updates: dict[str, RecipientUpdate]
    upstream: str | None = None
    events: Sequence[EventRow] = ()


Item = Put | Update


@dataclass(slots=True)
class _Row:
    rowid: int
    segment: int | None
    size: int
    recipients: list[SpoolRecipient]
    gone: bool = False  # an earlier outcome of the run deleted it


# Bound parameters per statement: SQLite before 3.32 allowed 999 (32,766 since).
MAX_VARIABLES = 999


def _chunks(n: int, largest: int = 512) -> list[int]:
    """n as powers of two of at most `largest` (a power of two), largest first:
    13 -> [8, 4, 1]; 70 with largest 32 -> [32, 32, 4, 2]."""
    out = []
    bit = min(largest, 1 << max(0, n.bit_length() - 1))
    while n:
        if n >= bit:
            out.append(bit)
            n -= bit
        else:
            bit >>= 1
    return out


def insert_rows(conn: sqlite3.Connection, table: str, columns: str, width: int,
                rows: Sequence[Sequence[Any]]) -> None:
    """INSERT every row, in order, in one step per power of two in len(rows) (at most
    MAX_VARIABLES parameters a step: 32 messages, 64 events)."""
    one = "(" + ",".join("?" * width) + ")"
    largest = 1 << ((MAX_VARIABLES // width).bit_length() - 1)
    start = 0
    for n in _chunks(len(rows), largest):
        params = [value for row in rows[start:start + n] for value in row]
        conn.execute(f"INSERT INTO {table} ({columns}) VALUES " + ",".join([one] * n), params)
        start += n


class Bulk:
    """Runs a batch's consecutive puts and outcomes for one spool (its segments and cap)."""

    def __init__(self, segments: Segments, max_bytes: int | None) -> None:
        self._segments = segments
        self._max_bytes = max_bytes

    def __call__(self, conn: sqlite3.Connection, items: Sequence[Item]) -> None:
        puts = [item for item in items if isinstance(item, Put)]
        outcomes = [item for item in items if isinstance(item, Update)]
        segments = self._segments
        if puts:
            size = sum(len(p.data) for p in puts)
            if self._max_bytes is not None:
                page_count, page_size = conn.execute(
                    "SELECT * FROM pragma_page_count, pragma_page_size").fetchone()
                # As a full disk would (451, the spool-full warning). In a run of several,
                # the writer then runs each put alone: those that fit are stored.
                if page_count * page_size + segments.live_bytes + size > self._max_bytes:
                    raise OSError(errno.ENOSPC,
                                  f"spool size cap of {self._max_bytes} bytes reached")
            places = segments.append_many([p.data for p in puts])
            insert_rows(conn, "messages", PUT_COLUMNS, 16,
                        [(*p.row, seg, off) for p, (seg, off) in zip(puts, places, strict=True)])
        rows = self._outcome_rows(conn, outcomes) if outcomes else {}
        deleted, applied = self._apply(conn, outcomes, rows)
        # Events in the operations' order; an outcome for a message that is not there (any
        # more) writes none, as Spool.update's operation does not.
        events = [e for item in items
                  if isinstance(item, Put) or id(item) in applied for e in item.events]
        if events:
            insert_rows(conn, "events", EVENT_COLUMNS, 8,
                        [(e.id, e.ts, e.type, e.queue_id, e.message_id, e.org, e.recipient,
                          e.data) for e in events])
        if deleted:
            conn.execute("DELETE FROM messages WHERE id IN (SELECT value FROM json_each(?))",
                         (orjson.dumps([r.rowid for r in deleted]).decode(),))
            blobs = [r.rowid for r in deleted if r.segment is None]  # spools before segments
            if blobs:
                conn.execute("DELETE FROM bodies WHERE id IN (SELECT value FROM json_each(?))",
                             (orjson.dumps(blobs).decode(),))
        for p in puts:
            segments.stored(len(p.data))
        for r in deleted:
            segments.released(r.segment, r.size)

    @staticmethod
    def _outcome_rows(conn: sqlite3.Connection, outcomes: Sequence[Update]) -> dict[str, _Row]:
        """The outcomes' messages, in one step (one JSON array: a row per step otherwise).
        Recipients are JSON text written by `encode_recipients`, so they carry no NUL."""
        ids = orjson.dumps(sorted({o.queue_id for o in outcomes})).decode()
        (text,) = conn.execute(
            "SELECT json_group_array(json_array(queue_id, id, recipients, body_seg, size))"
            " FROM messages WHERE queue_id IN (SELECT value FROM json_each(?))", (ids,)
        ).fetchone()
        rows = {}
        for qid, rowid, raw, seg, size in orjson.loads(text):
            try:
                rows[qid] = _Row(rowid, seg, size, decode_recipients(raw))
            except DamagedRow as exc:  # run alone, that outcome alone fails
                raise SpoolError(reason=f"spool row {qid} is damaged: {exc}") from exc
        return rows

    @staticmethod
    def _apply(conn: sqlite3.Connection, outcomes: Sequence[Update],
               rows: dict[str, _Row]) -> tuple[list[_Row], set[int]]:
        """Each outcome on its message, in order: the rows that no recipient keeps, and
        the outcomes that found their message (by id())."""
        deleted: list[_Row] = []
        applied: set[int] = set()
        for o in outcomes:
            row = rows.get(o.queue_id)
            if row is None or row.gone:
                continue
            applied.add(id(o))
            rcpts = row.recipients
            for r in rcpts:
                u = o.updates.get(r.rcpt)
                if u is not None:
                    r.status = u.status
                    r.attempts = u.attempts
                    r.next_attempt = u.next_attempt
                    r.last_reply = u.last_reply
            pending = sum(1 for r in rcpts if r.status is RcptStatus.PENDING)
            if pending == 0:
                row.gone = True
                deleted.append(row)
                continue
            conn.execute(
                "UPDATE messages SET recipients = ?, pending = ?, due = ?,"
                " upstream = coalesce(?, upstream) WHERE id = ?",
                (encode_recipients(rcpts), pending, due_of(rcpts), o.upstream, row.rowid),
            )
        return deleted, applied
