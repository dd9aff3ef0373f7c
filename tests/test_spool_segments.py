"""Body segments (relay/spool/segments.py): every acknowledged body reads back after SIGKILL,
bytes of a put that never committed are never read and go with their segment, a row whose
body is missing or cut short is quarantined at open (never delivered empty), orphan
segments are swept, emptied segments are removed, and a spool written before segments (BLOB
bodies) is still read and delivered after the upgrade."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from relay.core.errors import SpoolError
from relay.spool import RcptStatus, RecipientUpdate, Spool, schema, segments
from relay.spool.segments import SEGMENT_DIR, segment_name
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream
from tests.sinks import ThreadedSink


def body(n: int, size: int = 3000) -> bytes:
    line = f"body {n} ".encode() + b"x" * 60 + b"\r\n"
    return b"Subject: m%d\r\n\r\n" % n + line * max(1, size // len(line))


async def put(spool: Spool, n: int, data: bytes | None = None, **kw: object) -> str:
    return await spool.put(
        sender="a@example.com", recipients=[f"r{n}@example.org"],
        data=body(n) if data is None else data, client="127.0.0.1", org="acme",
        account="a@example.com", upstream="u", **kw,  # type: ignore[arg-type]
    )


async def delivered(spool: Spool, qid: str, n: int) -> None:
    await spool.update(qid, [RecipientUpdate(f"r{n}@example.org", RcptStatus.DELIVERED, 1, 0.0,
                                             "250 ok")])


def seg_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in (spool_dir / SEGMENT_DIR).iterdir())


@pytest.fixture
def one_body_per_segment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every put opens a new segment (the size limit is one byte)."""
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 1)


# --- SIGKILL ------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from relay.spool import Spool

    def body(k, i):
        line = f"{k}-{i} ".encode() + b"y" * 70 + b"\\r\\n"
        return line * (20 + (k * 37 + i * 11) % 900)   # 1.5 KB to 70 KB

    async def putter(spool, k):
        i = 0
        while True:
            qid = await spool.put(sender="a@example.com", data=body(k, i),
                                  recipients=[f"r{k}-{i}@example.org"],
                                  client="127.0.0.1", org="acme", account="a", upstream="u")
            print(qid, k, i, flush=True)
            i += 1

    async def main():
        spool = await Spool.open(sys.argv[1])
        await asyncio.gather(*(putter(spool, k) for k in range(8)))

    asyncio.run(main())
    """
)


async def test_every_acknowledged_body_reads_back_byte_for_byte_after_sigkill(
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: dict[str, tuple[int, int]] = {}
    try:
        while len(acked) < 300:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=10)
            assert line, "writer exited early"
            qid, k, i = line.decode().split()
            acked[qid] = (int(k), int(i))
    finally:
        proc.kill()  # mid-batch: bodies written, rows not committed, are likely
        await asyncio.wait_for(proc.wait(), timeout=5)
    assert proc.returncode == -signal.SIGKILL
    spool = await Spool.open(tmp_path)
    try:
        for qid, (k, i) in acked.items():
            line = f"{k}-{i} ".encode() + b"y" * 70 + b"\r\n"
            assert await spool.read_body(qid) == line * (20 + (k * 37 + i * 11) % 900), qid
        # New bodies go to a new segment, never after a possibly half-written tail.
        before = seg_files(tmp_path)
        await put(spool, 1)
        assert len(seg_files(tmp_path)) == len(before) + 1
    finally:
        await spool.close()


# --- a put that never committed ---------------------------------------------------------


async def test_bytes_of_a_put_that_did_not_commit_are_never_read_and_go_with_the_segment(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path)
    try:
        first = await put(spool, 1)
        # The same queue id again: the body is appended, then the row's INSERT fails. The
        # batch's bulk run (relay/spool/bulk.py) is undone and the put runs again alone in
        # a savepoint that is rolled back: its body is written twice, and no committed row
        # points at either copy.
        with pytest.raises(SpoolError):
            await put(spool, 2, data=b"never acknowledged\r\n" * 100, queue_id=first)
        second = await put(spool, 3)
        assert await spool.read_body(first) == body(1)
        assert await spool.read_body(second) == body(3)
        [name] = seg_files(tmp_path)
        size = (tmp_path / SEGMENT_DIR / name).stat().st_size
        assert size == len(body(1)) + 2 * 2000 + len(body(3))
    finally:
        await spool.close()
    spool = await Spool.open(tmp_path)  # after a restart: nothing appended to the old one
    try:
        assert sorted(m.queue_id for m in spool.iter_pending()) == sorted([first, second])
        assert await spool.read_body(second) == body(3)
        await delivered(spool, first, 1)
        await delivered(spool, second, 3)
        assert seg_files(tmp_path) == []  # the unread tail went with its segment
    finally:
        await spool.close()


# --- missing bodies ------------------------------------------------------------------------


async def test_rows_whose_body_is_missing_or_cut_short_are_quarantined_at_open(
    tmp_path: Path, one_body_per_segment: None, caplog: pytest.LogCaptureFixture
) -> None:
    spool = await Spool.open(tmp_path)
    try:
        ids = [await put(spool, n) for n in range(3)]
    finally:
        await spool.close()
    files = seg_files(tmp_path)
    assert len(files) == 3
    (tmp_path / SEGMENT_DIR / files[1]).unlink()  # gone
    os.truncate(tmp_path / SEGMENT_DIR / files[2], 100)  # cut short
    spool = await Spool.open(tmp_path)
    try:
        assert [m.queue_id for m in spool.iter_pending()] == [ids[0]]
        assert await spool.read_body(ids[0]) == body(0)
        for qid in ids[1:]:
            with pytest.raises(KeyError):
                await spool.read_body(qid)
    finally:
        await spool.close()
    conn = sqlite3.connect(tmp_path / schema.DB_NAME)
    try:
        kept = dict(conn.execute("SELECT queue_id, reason FROM quarantine").fetchall())
    finally:
        conn.close()
    assert set(kept) == set(ids[1:])
    assert "missing" in kept[ids[1]] and "cut short" in kept[ids[2]], kept
    assert "moved to quarantine" in caplog.text


async def test_a_body_gone_while_running_is_a_spool_error_not_an_empty_message(
    tmp_path: Path,
) -> None:
    spool = await Spool.open(tmp_path, body_cache_bytes=0)
    try:
        qid = await put(spool, 1)
        for name in seg_files(tmp_path):
            (tmp_path / SEGMENT_DIR / name).unlink()
        with pytest.raises(SpoolError, match="missing"):
            await spool.read_body(qid)
    finally:
        await spool.close()


# --- removal -------------------------------------------------------------------------------


async def test_orphan_segments_are_removed_at_open(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        qid = await put(spool, 1)
    finally:
        await spool.close()
    orphan = tmp_path / SEGMENT_DIR / segment_name(99)  # e.g. emptied, crash before unlink
    orphan.write_bytes(b"z" * 1000)
    spool = await Spool.open(tmp_path)
    try:
        assert not orphan.exists()
        assert await spool.read_body(qid) == body(1)
        await put(spool, 2)  # numbering goes on past the orphan's: never a reused name
        assert seg_files(tmp_path)[-1] == segment_name(100)
    finally:
        await spool.close()


async def test_a_segment_goes_when_its_last_body_is_delivered_or_deleted(
    tmp_path: Path, one_body_per_segment: None
) -> None:
    spool = await Spool.open(tmp_path)
    try:
        ids = [await put(spool, n) for n in range(3)]
        files = seg_files(tmp_path)
        await delivered(spool, ids[0], 0)
        assert seg_files(tmp_path) == files[1:]
        assert await spool.delete(ids[1])
        assert seg_files(tmp_path) == files[2:]
        # A deferral keeps the body.
        await spool.update(ids[2], [RecipientUpdate("r2@example.org", RcptStatus.PENDING, 1,
                                                    0.0, "451 later")])
        assert seg_files(tmp_path) == files[2:]
        await delivered(spool, ids[2], 2)  # the segment being written stays until it rolls
        await put(spool, 9)
        await put(spool, 10)
        assert files[2] not in seg_files(tmp_path)
    finally:
        await spool.close()


# --- upgrade from BLOB bodies --------------------------------------------------------------


def old_spool(directory: Path, messages: list[tuple[str, str, bytes]]) -> None:
    """A spool as the relay wrote it before body segments: the schema without the
    `body-segments` step, each body a BLOB row in `bodies`."""
    directory.mkdir(parents=True, exist_ok=True)
    before = [s for s in schema.STEPS if s[0] != "body-segments"]
    assert len(before) == len(schema.STEPS) - 1
    real, schema.STEPS[:] = list(schema.STEPS), before
    try:
        conn = schema.connect(directory / schema.DB_NAME)
        schema.init_schema(conn)
    finally:
        schema.STEPS[:] = real
    with conn:
        for qid, rcpt, data in messages:
            cur = conn.execute(
                "INSERT INTO messages (queue_id, received_at, sender, client, org, account,"
                " upstream, size, held, is_dsn, pending, recipients) VALUES"
                " (?, 1000.0, 'a@x.test', '127.0.0.1', 'default', 'a@x.test', 'plain', ?, 0, 0,"
                " 1, ?)",
                (qid, len(data), json.dumps([[rcpt, "pending", 0, 0.0, ""]])),
            )
            conn.execute("INSERT INTO bodies (id, data) VALUES (?, ?)", (cur.lastrowid, data))
    conn.close()


async def test_a_spool_with_blob_bodies_is_read_and_finished_after_the_upgrade(
    tmp_path: Path,
) -> None:
    data = b"Subject: old\r\n\r\n.leading dot, as stored unstuffed\r\n"
    old_spool(tmp_path, [("0123456789ABCDEF", "r1@example.org", data)])
    spool = await Spool.open(tmp_path)
    try:
        [msg] = list(spool.iter_pending())
        stored = await spool.body(msg.queue_id)
        assert stored.data == data and not stored.wire  # delivery restuffs it
        new = await put(spool, 2)  # new mail beside it goes to a segment
        assert seg_files(tmp_path)
        await delivered(spool, msg.queue_id, 1)
        assert await spool.read_body(new) == body(2)
    finally:
        await spool.close()
    conn = sqlite3.connect(tmp_path / schema.DB_NAME)
    try:
        assert conn.execute("SELECT count(*) FROM bodies").fetchone()[0] == 0
    finally:
        conn.close()


def test_a_relay_delivers_mail_spooled_before_the_upgrade(tmp_path: Path) -> None:
    """`relay serve` on a spool of BLOB bodies: the old mail reaches the upstream, its
    leading-dot line dot-stuffed on the wire and unstuffed by the upstream again."""
    with ThreadedSink() as sink:
        cfg = RelayConfig(
            tmp_path / "relay", upstreams={"plain": plain_upstream(sink.port)},
            default_upstream="plain",
        ).write()
        old = [(f"0123456789ABCDE{i}", f"r{i}@y.test",
                b"Subject: old %d\r\n\r\n.dot line\r\nbody\r\n" % i) for i in range(3)]
        old_spool(cfg / "spool", old)
        with RelayProcess(cfg) as relay:
            sink.wait_for(3, 15)
            relay.wait_events("delivered", 3)
    got = sorted(m.data for m in sink.messages)
    assert got == sorted(data for _, _, data in old)
