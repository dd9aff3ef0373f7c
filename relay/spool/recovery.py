"""Recovery: streaming scan of unfinished messages, the scheduler's due-order reads, quarantine
of damaged rows, and moving a database that cannot be opened out of the way."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from relay.spool.schema import MESSAGE_COLUMNS, DamagedRow, connect, decode_message, number
from relay.spool.segments import MissingBody, Segments, fsync_dir
from relay.spool.types import RcptStatus, SpoolMessage

log = logging.getLogger("relay.spool")

PAGE_ROWS = 1000  # rows per read transaction: bounded memory, no long-held WAL snapshot


def scan_pending(db_path: Path, segments: Segments | None = None) -> Iterator[SpoolMessage]:
    """Every stored message with a PENDING recipient, oldest row first, one page at a time.

    A row that does not decode is not yielded: it is moved to the `quarantine` table (with
    its body) and reported with a warning, so one bad row never stops recovery of the rest.
    """
    conn = connect(db_path)
    damaged: list[tuple[int, str]] = []
    try:
        last = 0
        while True:
            try:
                rows = conn.execute(
                    f"SELECT id, {MESSAGE_COLUMNS} FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                    (last, PAGE_ROWS),
                ).fetchall()
            except sqlite3.DatabaseError as exc:
                # Page-level damage: keep what was recovered so far and let the relay start.
                log.error(
                    "spool recovery stopped after row %d: %s; the rest of %s needs "
                    "`sqlite3 %s .recover`",
                    last,
                    exc,
                    db_path,
                    db_path,
                )
                return
            if not rows:
                return
            for row in rows:
                last = row[0]
                try:
                    message = decode_message(row[1:])
                except DamagedRow as exc:
                    damaged.append((row[0], str(exc)))
                    continue
                if any(r.status is RcptStatus.PENDING for r in message.recipients):
                    yield message
    finally:
        if damaged:
            # Not the writer's connection: the segment is only read (the body goes into the
            # quarantined row); its space is reclaimed by the next open's sweep.
            quarantine(conn, damaged, segments, release=False)
        conn.close()


@dataclass(slots=True)
class DueBatch:
    """Deliverable (not held) messages in (due, queue_id) order, each with its `due`.
    `last` is the key of the last row read (damaged rows included), `exhausted` that no row
    follows it; `damaged` are (rowid, reason) of rows that did not decode."""

    messages: list[tuple[float, SpoolMessage]]
    last: tuple[float, str] | None
    exhausted: bool
    damaged: list[tuple[int, str]]


def read_due(conn: sqlite3.Connection, after: tuple[float, str] | None, limit: int) -> DueBatch:
    """Up to `limit` deliverable messages whose (due, queue_id) is >= `after` (all when None),
    through the messages_due index."""
    sql = f"SELECT id, due, {MESSAGE_COLUMNS} FROM messages INDEXED BY messages_due WHERE held = 0"
    args: tuple[object, ...] = ()
    if after is not None:
        sql += " AND (due, queue_id) >= (?, ?)"
        args = after
    rows = conn.execute(sql + " ORDER BY due, queue_id LIMIT ?", (*args, limit)).fetchall()
    out: list[tuple[float, SpoolMessage]] = []
    damaged: list[tuple[int, str]] = []
    last: tuple[float, str] | None = None
    for row in rows:
        try:
            due = number(row[1], "due")
            message = decode_message(row[2:])
        except DamagedRow as exc:
            damaged.append((row[0], str(exc)))
            if isinstance(row[1], int | float) and isinstance(row[2], str):
                last = (float(row[1]), row[2])
            continue
        last = (due, message.queue_id)
        out.append((due, message))
    return DueBatch(out, last, len(rows) < limit, damaged)


def quarantine(
    conn: sqlite3.Connection,
    rows: list[tuple[int, str]],
    segments: Segments | None = None,
    *,
    release: bool = True,
) -> None:
    """Move damaged message rows (and their bodies) into the quarantine table, in one
    transaction; logged one warning per row."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        move_to_quarantine(conn, rows, report=False, segments=segments, release=release)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.error("spool: could not quarantine %d damaged row(s): %s", len(rows), exc)
        return
    for rowid, reason in rows:
        log.warning("spool: damaged row %d moved to quarantine: %s", rowid, reason)


def move_to_quarantine(
    conn: sqlite3.Connection,
    rows: list[tuple[int, str]],
    *,
    report: bool = True,
    segments: Segments | None = None,
    release: bool = True,
) -> None:
    """The moves of `quarantine` inside the caller's transaction (the spool's writer). A
    body in a segment is copied into the quarantined row (when it is still there), and the
    segment released."""
    now = time.time()
    for rowid, reason in rows:
        seg = conn.execute(
            "SELECT body_seg, body_off, size FROM messages WHERE id = ?", (rowid,)
        ).fetchone()
        conn.execute(
            "INSERT INTO quarantine (moved_at, reason, id, queue_id, received_at, sender,"
            " client, org, account, upstream, size, held, is_dsn, pending, recipients, body)"
            " SELECT ?, ?, m.id, m.queue_id, m.received_at, m.sender, m.client, m.org,"
            " m.account, m.upstream, m.size, m.held, m.is_dsn, m.pending, m.recipients,"
            " b.data FROM messages AS m LEFT JOIN bodies AS b ON b.id = m.id WHERE m.id = ?",
            (now, reason, rowid),
        )
        if seg is not None and seg[0] is not None:
            qid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            body = _segment_body(segments, seg)
            conn.execute("UPDATE quarantine SET body = ? WHERE qid = ?", (body, qid))
        conn.execute("DELETE FROM messages WHERE id = ?", (rowid,))
        if release and segments is not None and seg is not None and seg[0] is not None:
            segments.released(int(seg[0]), int(seg[2]))
        conn.execute("DELETE FROM bodies WHERE id = ?", (rowid,))
        if report:
            log.warning("spool: damaged row %d moved to quarantine: %s", rowid, reason)


def is_damage(exc: sqlite3.DatabaseError) -> bool:
    """True for 'this file is not a (healthy) database', as opposed to I/O or permissions."""
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


def move_aside(db_path: Path) -> Path:
    """Rename a damaged database (and its WAL and shared-memory files) to *.damaged-<time>
    so a fresh spool can start; the old files stay for `sqlite3 … .recover`."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = db_path.with_name(f"{db_path.name}.damaged-{stamp}-{os.getpid()}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{db_path}{suffix}")
        if src.exists():
            src.rename(Path(f"{target}{suffix}"))
    fsync_dir(db_path.parent)
    return target


def _segment_body(segments: Segments | None, where: tuple[object, ...]) -> bytes | None:
    seg, off, size = where
    if segments is None or not all(isinstance(v, int) for v in where):
        return None
    assert isinstance(seg, int) and isinstance(off, int) and isinstance(size, int)
    try:
        return segments.read(seg, off, size)
    except (MissingBody, OSError):
        return None
