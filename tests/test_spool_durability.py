"""Spool durability: SIGKILL of a writing process, write failures (nothing half-kept, then
recovery), damaged rows and a damaged database file at startup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sqlite3
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.core.errors import SpoolError, to_reply
from relay.spool import RcptStatus, Spool
from relay.spool.health import is_full
from relay.spool.segments import MissingBody, Segments

BODY = b"Subject: durable\r\n\r\n" + b"x" * 5000 + b"\r\n"


async def put(spool: Spool, n: int, data: bytes = BODY) -> str:
    return await spool.put(
        sender="a@example.com",
        recipients=[f"r{n}@example.org", "all@example.org"],
        data=data,
        client="127.0.0.1",
        org="acme",
        account="a@example.com",
        upstream="sendgrid",
    )


def raw_counts(db: Path) -> tuple[int, int, int]:
    """(messages, bodies, messages without a body) read by an independent connection: a body
    is a BLOB row or the bytes its row points at in a body segment file."""
    segments = Segments(db.parent)
    conn = sqlite3.connect(db)
    try:
        messages, blobs = conn.execute(
            "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM bodies)"
        ).fetchone()
        present = missing = 0
        for seg, off, size in conn.execute(
            "SELECT body_seg, body_off, size FROM messages WHERE body_seg IS NOT NULL"
        ):
            try:
                segments.read(seg, off, size)
            except MissingBody:
                missing += 1
            else:
                present += 1
        (no_blob,) = conn.execute(
            "SELECT count(*) FROM messages m WHERE body_seg IS NULL AND NOT EXISTS"
            " (SELECT 1 FROM bodies b WHERE b.id = m.id)"
        ).fetchone()
        return int(messages), int(blobs) + present, int(no_blob) + missing
    finally:
        conn.close()


# --- crash ----------------------------------------------------------------------------------

WRITER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from relay.spool import Spool

    async def putter(spool, k):
        i = 0
        while True:
            qid = await spool.put(sender="a@example.com", data=b"x" * 5000,
                                  recipients=[f"r{k}-{i}@example.org", "all@example.org"],
                                  client="127.0.0.1", org="acme", account="a", upstream="u")
            print(qid, f"r{k}-{i}@example.org", flush=True)
            i += 1

    async def main():
        spool = await Spool.open(sys.argv[1])
        await asyncio.gather(*(putter(spool, k) for k in range(8)))

    asyncio.run(main())
    """
)


async def test_every_acknowledged_put_survives_sigkill(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    acked: dict[str, str] = {}
    try:
        while len(acked) < 400:
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=5)
            assert line, "writer exited early"
            qid, rcpt = line.decode().split()
            acked[qid] = rcpt
    finally:
        proc.kill()  # SIGKILL: no close(), no flush, no atexit
        await asyncio.wait_for(proc.wait(), timeout=5)
    assert proc.returncode == -signal.SIGKILL

    spool = await Spool.open(tmp_path)  # the dead process's lock is gone with it
    try:
        recovered = {m.queue_id: m for m in spool.iter_pending()}
        missing = set(acked) - set(recovered)
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for qid, rcpt in acked.items():
            msg = recovered[qid]
            assert [(r.rcpt, r.status) for r in msg.recipients] == [
                (rcpt, RcptStatus.PENDING),
                ("all@example.org", RcptStatus.PENDING),
            ]
        assert await spool.read_body(next(iter(acked))) == b"x" * 5000
    finally:
        await spool.close()


# --- write failures -------------------------------------------------------------------------


@contextlib.contextmanager
def kernel_refuses_file_writes() -> Iterator[None]:
    """RLIMIT_FSIZE=0: the kernel fails every write to a regular file with EFBIG (root is not
    exempt), which SQLite sees exactly like a full disk: the write() fails. SIGXFSZ, which
    would otherwise kill the process, is ignored meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_failed_write_raises_spool_error_keeps_nothing_and_recovers(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        kept = [await put(spool, i) for i in range(3)]
        with kernel_refuses_file_writes():
            results = await asyncio.gather(
                *(put(spool, 100 + i) for i in range(20)), return_exceptions=True
            )
        assert all(isinstance(r, SpoolError) for r in results), results
        assert to_reply(results[0]).startswith("451 4.3.0")  # type: ignore[arg-type]
        # Nothing of the failed batch is visible, nothing orphaned.
        assert raw_counts(spool.db_path) == (3, 3, 0)
        assert (await spool.summary())["messages"] == 3
        # The condition cleared: the same open spool writes again.
        kept.append(await put(spool, 200))
    finally:
        await spool.close()
    spool = await Spool.open(tmp_path)
    try:
        assert sorted(m.queue_id for m in spool.iter_pending()) == sorted(kept)
    finally:
        await spool.close()


async def test_size_cap_fails_puts_without_half_kept_rows(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path, max_bytes=256 * 1024)
    kept: list[str] = []
    try:
        refused = None
        for i in range(200):
            try:
                kept.append(await put(spool, i, data=BODY * 2))
            except SpoolError as exc:
                refused = exc
                break
        assert refused is not None, "the size cap was never reached"
        assert is_full(refused), refused.reason  # 451 and the spool-full warning
        # Concurrent puts at the cap: each either fully stored or not at all.
        results = await asyncio.gather(
            *(put(spool, 1000 + i, data=BODY * 2) for i in range(10)), return_exceptions=True
        )
        assert all(isinstance(r, SpoolError) for r in results)
        assert raw_counts(spool.db_path) == (len(kept), len(kept), 0)
        # Space freed by finished mail is reused: puts succeed again.
        for qid in kept[:10]:
            assert await spool.delete(qid)
        del kept[:10]
        kept.append(await put(spool, 5000))
    finally:
        await spool.close()
    spool = await Spool.open(tmp_path)
    try:
        assert sorted(m.queue_id for m in spool.iter_pending()) == sorted(kept)
    finally:
        await spool.close()


# --- damage at startup ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "column, garbage",
    [
        ("recipients", b"\x00\xff not json"),
        ("recipients", '[["b@example.org","sent-to-mars",0,0.0,""]]'),
        ("received_at", "yesterday"),
    ],
)
async def test_damaged_row_is_quarantined_and_the_rest_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, column: str, garbage: object
) -> None:
    spool = await Spool.open(tmp_path)
    ids = [await put(spool, i) for i in range(3)]
    await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")
    with conn:
        conn.execute(f"UPDATE messages SET {column} = ? WHERE queue_id = ?", (garbage, ids[1]))
    conn.close()

    spool = await Spool.open(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="relay.spool"):
            recovered = [m.queue_id for m in spool.iter_pending()]
        assert recovered == [ids[0], ids[2]]
        assert any("quarantine" in r.getMessage() for r in caplog.records)
        assert await spool.get(ids[1]) is None
        conn = sqlite3.connect(tmp_path / "spool.db")
        try:
            row = conn.execute(f"SELECT queue_id, {column}, body FROM quarantine").fetchall()
        finally:
            conn.close()
        assert row == [(ids[1], garbage, BODY)]  # kept verbatim, with its body
        assert [m.queue_id for m in spool.iter_pending()] == [ids[0], ids[2]]
        assert (await spool.summary())["messages"] == 2
    finally:
        await spool.close()


def moved_aside(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in directory.iterdir() if p.name.startswith("spool.db.damaged-")]


async def test_database_that_cannot_be_opened_is_moved_aside(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = os.urandom(8192)
    (tmp_path / "spool.db").write_bytes(garbage)
    with caplog.at_level(logging.ERROR, logger="relay.spool"):
        spool = await Spool.open(tmp_path)
    try:
        assert any("moved aside" in r.getMessage() for r in caplog.records)
        assert moved_aside(tmp_path) == [garbage]  # kept for forensic recovery
        qid = await put(spool, 1)
        assert [m.queue_id for m in spool.iter_pending()] == [qid]
    finally:
        await spool.close()


async def test_unusable_directory_is_a_spool_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError):
        await Spool.open(blocker)
