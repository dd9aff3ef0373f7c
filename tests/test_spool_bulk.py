"""A batch's puts and outcomes run together (relay/spool/bulk.py): the same rows, events and
event order as each run alone, in a number of statements that does not grow with the run;
one `pwritev` for the bodies; and through the spool, a failing put or outcome in a run fails
alone while the others are stored."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from relay.core.errors import SpoolError
from relay.spool import RcptStatus, RecipientUpdate, Spool, SpoolRecipient, schema
from relay.spool.bulk import Bulk, Item, Put, Update, _chunks, insert_rows
from relay.spool.segments import Segments
from relay.spool.types import EventRow

# --- the runner on its own database -------------------------------------------------------


class Store:
    """A spool database and segments, without the writer thread."""

    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.conn = schema.connect(directory / schema.DB_NAME)
        schema.init_schema(self.conn)
        self.segments = Segments(directory)
        self.segments.open(self.conn)
        self.bulk = Bulk(self.segments, max_bytes)
        self.statements: list[str] = []  # what the connection ran
        self.conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        # Each step of a trigger is reported again with its statement's text.
        if not self.statements or self.statements[-1] != sql:
            self.statements.append(sql)

    def run(self, items: Sequence[Item]) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.bulk(self.conn, list(items))
        except BaseException:
            self.conn.execute("ROLLBACK")
            self.segments.after_failure()
            raise
        self.segments.before_commit(self.conn)
        self.conn.execute("COMMIT")
        self.segments.after_commit()

    def state(self) -> tuple[list[Any], list[Any], list[bytes]]:
        """Messages (without row ids and body places), events in order, and bodies."""
        messages = self.conn.execute(
            "SELECT queue_id, received_at, sender, client, org, account, upstream, size, held,"
            " is_dsn, pending, recipients, dsn, wire, due FROM messages ORDER BY queue_id"
        ).fetchall()
        events = self.conn.execute(
            "SELECT id, ts, type, queue_id, message_id, org, recipient, data FROM events"
            " ORDER BY seq").fetchall()
        bodies = [self.segments.read(seg, off, size) for seg, off, size in self.conn.execute(
            "SELECT body_seg, body_off, size FROM messages ORDER BY queue_id")]
        return messages, events, bodies

    def close(self) -> None:
        self.segments.close()
        self.conn.close()


def event(n: int, qid: str, kind: str) -> EventRow:
    return EventRow(id=f"E{kind}{n}", ts=1000.0 + n, type=kind, queue_id=qid,
                    message_id=f"m{n}@x", org="acme", recipient="", data=f'{{"n":{n}}}')


def put(n: int, recipients: Sequence[str] = ("r@example.org",)) -> Put:
    qid = f"Q{n:04d}"
    rcpts = schema.encode_recipients(
        [SpoolRecipient(r, RcptStatus.PENDING) for r in recipients])
    data = b"body %d\r\n" % n * (n + 1)
    row = (qid, 1000.0 + n, f"s{n}@example.com", "127.0.0.1", "acme", "acct", "u",
           len(data), 0, 0, len(recipients), rcpts, None if n % 2 else "RET=HDRS", n % 2)
    return Put(row, data, [event(n, qid, "received")])


def outcome(n: int, status: RcptStatus = RcptStatus.DELIVERED, rcpt: str = "r@example.org",
            tag: str = "") -> Update:
    qid = f"Q{n:04d}"
    update = RecipientUpdate(rcpt, status, 1, 2000.0 + n, f"250 ok {n}")
    return Update(qid, {rcpt: update}, "v" if status is RcptStatus.PENDING else None,
                   [event(n, qid, (status.value + tag)[:20])])


def scenario() -> Iterator[Sequence[Item]]:
    """Batches that end in every state: puts, deliveries, a deferral that keeps the message
    (re-routed), a message with two recipients finished one at a time, an outcome for an
    unknown message, and two outcomes for one message in one run (the second finds it gone)."""
    yield [put(n) for n in range(1, 8)] + [put(8, ("a@x.org", "b@x.org"))]
    yield [outcome(1), outcome(2, RcptStatus.PENDING), outcome(3, RcptStatus.BOUNCED),
           put(9), outcome(99), outcome(8, rcpt="a@x.org"), outcome(4), outcome(4, tag="x")]
    yield [outcome(2), outcome(8, RcptStatus.PENDING, rcpt="b@x.org"), put(10), outcome(5)]


def test_a_run_writes_what_its_items_write_one_by_one(tmp_path: Path) -> None:
    together, alone = Store(tmp_path / "together"), Store(tmp_path / "alone")
    try:
        for batch in scenario():
            together.run(batch)
        for batch in scenario():
            for item in batch:
                alone.run([item])
        assert together.state() == alone.state()
        messages, events, bodies = together.state()
        # What the scenario leaves: 6, 7, 8 (b still pending), 9 and 10 queued.
        assert [m[0] for m in messages] == ["Q0006", "Q0007", "Q0008", "Q0009", "Q0010"]
        assert bodies[0] == b"body 6\r\n" * 7
        assert "E" + "pending" + "8" in [e[0] for e in events]
        assert "E" + "delivered" + "99" not in [e[0] for e in events]  # unknown message
        assert "E" + "deliveredx" + "4" not in [e[0] for e in events]  # found it gone
        rcpts = schema.decode_recipients(messages[2][11])
        assert [(r.rcpt, r.status) for r in rcpts] == [
            ("a@x.org", RcptStatus.DELIVERED), ("b@x.org", RcptStatus.PENDING)]
        assert messages[2][6] == "v" and messages[2][14] == 2008.0  # re-routed, due
        assert [e[0] for e in events][:3] == ["Ereceived1", "Ereceived2", "Ereceived3"]
    finally:
        together.close()
        alone.close()


def test_a_runs_statements_do_not_grow_with_its_length(tmp_path: Path) -> None:
    counts = []
    for n in (8, 64, 256):
        store = Store(tmp_path / str(n))
        try:
            store.run([put(i) for i in range(n)])
            store.statements.clear()
            store.run([put(i) for i in range(n, 2 * n)] + [outcome(i) for i in range(n)])
            counts.append(len(store.statements))
            assert store.conn.execute("SELECT count(*) FROM messages").fetchone()[0] == n
        finally:
            store.close()
    # BEGIN, the SELECT, the DELETE and COMMIT, and the INSERTs of messages and events (32
    # messages or 64 events each: at most 999 parameters); one by one, a run of n puts and
    # n outcomes would take 5n.
    assert counts == [4 + 1 + 1, 4 + 2 + 2, 4 + 8 + 8], counts


def test_rows_go_in_chunks_of_powers_of_two_in_their_order() -> None:
    assert [_chunks(n) for n in (1, 2, 13, 512)] == [[1], [2], [8, 4, 1], [512]]
    assert _chunks(70, 32) == [32, 32, 4, 2]
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
    seen: list[str] = []
    conn.set_trace_callback(seen.append)
    rows = [(i, f"v{i}\x00z", b"\x00" * i) for i in range(13)]  # bound, not spelled out
    insert_rows(conn, "t", "a, b, c", 3, rows)
    assert len(seen) == 3
    assert conn.execute("SELECT a, b, c FROM t ORDER BY rowid").fetchall() == rows


def spied_segments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   **kw: Any) -> tuple[Segments, list[int]]:
    """Open segments (on an empty table), and the number of buffers of each `pwritev`."""
    calls: list[int] = []
    real = os.pwritev

    def spy(fd: int, buffers: Sequence[bytes], offset: int) -> int:
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", spy)
    seg = Segments(tmp_path, **kw)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE messages (body_seg INTEGER, body_off INTEGER, size INTEGER)")
    conn.execute("CREATE INDEX messages_body ON messages (body_seg, body_off, size)")
    seg.open(conn)
    return seg, calls


def test_the_bodies_of_a_run_go_in_one_write_per_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seg, calls = spied_segments(tmp_path, monkeypatch, segment_bytes=1000)
    bodies = [bytes([65 + i]) * 300 for i in range(7)]
    try:
        places = seg.append_many(bodies)
        # A segment takes bodies while it is short of 1,000 bytes: 4 (1,200), then 3.
        assert calls == [4, 3]
        assert [p[1] for p in places] == [0, 300, 600, 900, 0, 300, 600]
        assert places[3][0] != places[4][0]
        assert [seg.read(s, o, 300) for s, o in places] == bodies
    finally:
        seg.close()


def test_a_call_writes_about_a_megabyte_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large bodies go one to a call (a whole batch of 1 MB bodies in one call cost the
    writer 30% more CPU), small ones many to a call."""
    seg, calls = spied_segments(tmp_path, monkeypatch)
    try:
        big = [bytes([65 + i]) * 1_000_000 for i in range(3)]
        small = [bytes([97 + i % 26]) * 5000 for i in range(300)]
        places = seg.append_many(big + small)
        # Up to 1 MiB (1,048,576 bytes) a call: a big one alone, the last with the first
        # nine small ones (1,045,000 bytes), then 209 small ones, then the rest.
        assert calls == [1, 1, 10, 209, 82]
        assert [seg.read(s, o, len(b)) for (s, o), b in zip(places, big + small,
                                                           strict=True)] == big + small
    finally:
        seg.close()


# --- through the spool: a failure in a run stays with its own operation -------------------


async def puts(spool: Spool, ns: Sequence[int], **kw: Any) -> list[str | BaseException]:
    async def one(n: int) -> str:
        return await spool.put(sender="a@example.com", recipients=[f"r{n}@example.org"],
                               data=b"body %d\r\n" % n * 200, client="127.0.0.1", org="acme",
                               account="a", upstream="u", **kw)

    return list(await asyncio.gather(*(one(n) for n in ns), return_exceptions=True))


async def test_a_duplicate_queue_id_in_a_run_fails_alone(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        [taken] = await puts(spool, [0])
        assert isinstance(taken, str)
        for _ in range(5):  # until the writer took them as one batch
            results = await asyncio.gather(
                puts(spool, range(1, 9)), puts(spool, [99], queue_id=taken))
            if spool.stats.largest_batch > 2:
                break
        assert spool.stats.largest_batch > 2
        good, [bad] = results
        assert all(isinstance(r, str) for r in good)
        assert isinstance(bad, SpoolError)
        for qid, n in zip(good, range(1, 9), strict=True):
            assert await spool.read_body(str(qid)) == b"body %d\r\n" % n * 200
        assert await spool.read_body(taken) == b"body 0\r\n" * 200
    finally:
        await spool.close()


async def test_past_the_size_cap_a_run_stores_the_puts_that_fit(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    await spool.close()
    db = (tmp_path / schema.DB_NAME).stat().st_size
    # Room for the database as it is and a little: a batch of ten 1,800-byte bodies does
    # not fit whole, so its puts run one by one and the first few are stored.
    spool = await Spool.open(tmp_path, max_bytes=db + 9000)
    try:
        results = await puts(spool, range(10))
        stored = [r for r in results if isinstance(r, str)]
        refused = [r for r in results if isinstance(r, SpoolError)]
        assert stored and refused and len(stored) + len(refused) == 10
        assert spool.stats.largest_batch > 1
        assert "size cap" in str(refused[0].reason)
        for qid in stored:
            assert (await spool.read_body(qid)).startswith(b"body ")
    finally:
        await spool.close()


async def test_a_damaged_row_fails_its_outcome_alone(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        qids = [str(q) for q in await puts(spool, range(6))]
        conn = sqlite3.connect(tmp_path / schema.DB_NAME)
        conn.execute("UPDATE messages SET recipients = 'not json' WHERE queue_id = ?",
                     (qids[2],))
        conn.commit()
        conn.close()

        async def deliver(qid: str, n: int) -> None:
            await spool.update(qid, [RecipientUpdate(f"r{n}@example.org",
                                                     RcptStatus.DELIVERED, 1, 0.0, "250 ok")])

        results = await asyncio.gather(*(deliver(q, n) for n, q in enumerate(qids)),
                                       return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["NoneType"] * 2 + ["SpoolError"] + [
            "NoneType"] * 3
        assert "damaged" in str(results[2])
        conn = sqlite3.connect(tmp_path / schema.DB_NAME)
        assert conn.execute("SELECT queue_id FROM messages").fetchall() == [(qids[2],)]
        conn.close()
    finally:
        await spool.close()
