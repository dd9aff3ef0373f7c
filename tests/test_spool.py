"""Spool API behaviour: put/get/update/hold/delete/list/summary, group commit, close, lock."""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import string
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import load_config
from relay.core.errors import SpoolError, to_reply
from relay.runtime.node import Relay
from relay.spool import (
    RcptStatus,
    RecipientUpdate,
    Spool,
    SpoolMessage,
    is_queue_id,
    new_queue_id,
    schema,
)
from relay.spool.queue_id import QueueIdFactory, decode, encode
from relay.spool.schema import connect
from relay.spool.segments import Segments
from tests.relayproc import RelayConfig

BODY = b"Subject: hi\r\n\r\nhello\r\n"


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = await Spool.open(tmp_path / "spool")
    yield s
    await s.close()


async def put(spool: Spool, *, rcpts: tuple[str, ...] = ("b@example.org",), **kw: object) -> str:
    args: dict[str, object] = {
        "sender": "a@example.com",
        "recipients": list(rcpts),
        "data": BODY,
        "client": "127.0.0.1",
        "org": "acme",
        "account": "a@example.com",
        "upstream": "sendgrid",
    }
    args.update(kw)
    return await spool.put(**args)  # type: ignore[arg-type]


def done(rcpt: str, status: RcptStatus = RcptStatus.DELIVERED) -> RecipientUpdate:
    return RecipientUpdate(rcpt, status, attempts=1, next_attempt=0.0, last_reply="250 2.0.0 ok")


# --- queue ids -------------------------------------------------------------------------------


def test_queue_ids_are_short_unique_sortable_and_reply_safe() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # time-sortable, strictly increasing within a process
    allowed = set(string.digits + string.ascii_uppercase)
    assert all(len(i) == 16 and set(i) <= allowed and is_queue_id(i) for i in ids)
    assert not is_queue_id("../etc/passwd!!!")
    assert not is_queue_id("0123")


def test_a_forked_child_draws_other_random_bits_than_its_parent() -> None:
    """Ids made in the same microsecond by two processes must still differ: a process forked
    after an id was made must not go on with its parent's random pool."""
    factory = QueueIdFactory()
    factory()  # the pool is filled before the fork
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next random bits, then leave at once
        os.write(write_end, factory._random_bits().to_bytes(4, "big"))
        os._exit(0)
    os.close(write_end)
    child_bits = int.from_bytes(os.read(read_end, 4), "big")
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child_bits != factory._random_bits()


@given(st.integers(min_value=0, max_value=(1 << 80) - 1))
def test_queue_id_encoding_round_trips_and_keeps_order(value: int) -> None:
    # The digits, most significant first, in Crockford's alphabet: the text ids had before
    # encode() became table lookups (issue 17), so old and new ids sort together.
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    assert encode(value) == "".join(alphabet[(value >> (5 * i)) & 31] for i in range(15, -1, -1))
    assert decode(encode(value)) == value
    if value > 0:
        assert encode(value - 1) < encode(value)


# --- put / get / read_body -----------------------------------------------------------------


async def test_put_is_committed_when_it_returns(spool: Spool) -> None:
    qid = await put(spool, rcpts=("b@example.org", "c@example.org"), received_at=1000.0)
    # An independent connection sees the row: put returned only after COMMIT.
    other = sqlite3.connect(spool.db_path)
    try:
        row = other.execute(
            "SELECT sender, pending, body_seg, body_off, size FROM messages WHERE queue_id = ?",
            (qid,),
        ).fetchone()
    finally:
        other.close()
    assert row[:2] == ("a@example.com", 2)
    # ... and its body is in its segment file already (written before the row committed).
    assert Segments(spool.directory).read(*row[2:]) == BODY
    msg = await spool.get(qid)
    assert msg is not None
    assert (msg.queue_id, msg.received_at, msg.size, msg.held, msg.is_dsn) == (
        qid,
        1000.0,
        len(BODY),
        False,
        False,
    )
    assert (msg.sender, msg.client, msg.org, msg.account, msg.upstream) == (
        "a@example.com",
        "127.0.0.1",
        "acme",
        "a@example.com",
        "sendgrid",
    )
    assert [(r.rcpt, r.status, r.attempts) for r in msg.recipients] == [
        ("b@example.org", RcptStatus.PENDING, 0),
        ("c@example.org", RcptStatus.PENDING, 0),
    ]
    assert await spool.read_body(qid) == BODY


def test_write_connections_fsync_every_commit(tmp_path: Path) -> None:
    conn = connect(tmp_path / "x.db")
    try:
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        conn.close()


async def test_null_sender_dsn_and_binary_body_round_trip(spool: Spool) -> None:
    data = bytes(range(256)) * 40
    qid = await put(spool, sender="", is_dsn=True, data=data)
    msg = await spool.get(qid)
    assert msg is not None and msg.sender == "" and msg.is_dsn
    assert await spool.read_body(qid) == data
    other = sqlite3.connect(spool.db_path)  # the disk copy, not the in-memory one
    try:
        row = other.execute(
            "SELECT body_seg, body_off, size FROM messages WHERE queue_id = ?", (qid,)
        ).fetchone()
    finally:
        other.close()
    assert Segments(spool.directory).read(*row) == data


async def test_bodies_are_served_from_memory_until_the_first_update(tmp_path: Path) -> None:
    bodies = [b"Subject: %d\r\n\r\n" % i + b"x" * 100 for i in range(3)]
    spool = await Spool.open(tmp_path / "spool", body_cache_bytes=2 * len(bodies[0]))
    try:
        q = [await put(spool, data=b) for b in bodies]
        # The newest two are cached: the very object the listener handed in, no copy.
        assert await spool.read_body(q[2]) is bodies[2]
        # The oldest was evicted past the cap: read back from disk.
        first = await spool.read_body(q[0])
        assert first == bodies[0] and first is not bodies[0]
        # An attempt's outcome drops it: a retry reads the disk copy.
        retry = RecipientUpdate("b@example.org", RcptStatus.PENDING, 1, 9e9, "451 4.4.1 later")
        await spool.update(q[2], [retry])
        again = await spool.read_body(q[2])
        assert again == bodies[2] and again is not bodies[2]
        # A deleted message is gone from memory too.
        assert await spool.delete(q[1])
        with pytest.raises(KeyError):
            await spool.read_body(q[1])
    finally:
        await spool.close()
    with pytest.raises(SpoolError):
        await spool.read_body(q[0])


async def test_body_cache_can_be_disabled(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", body_cache_bytes=0)
    try:
        qid = await put(spool, data=BODY + b"!")
        body = await spool.read_body(qid)
        assert body == BODY + b"!"
    finally:
        await spool.close()


async def test_unknown_ids(spool: Spool) -> None:
    assert await spool.get("0000000000000000") is None
    with pytest.raises(KeyError):
        await spool.read_body("0000000000000000")
    assert await spool.set_held("0000000000000000", held=True) is False
    assert await spool.delete("0000000000000000") is False
    await spool.update("0000000000000000", [done("x@example.org")])  # ignored


async def test_put_needs_a_recipient(spool: Spool) -> None:
    with pytest.raises(ValueError):
        await put(spool, rcpts=())


async def test_concurrent_puts_share_commits(spool: Spool) -> None:
    before = spool.stats.commits
    ids = await asyncio.gather(*(put(spool, rcpts=(f"r{i}@example.org",)) for i in range(60)))
    assert len(set(ids)) == 60
    commits = spool.stats.commits - before
    # Group commit: not one fsync per message. Bounds leave room for a loaded CI machine
    # (a slow first fsync splits the burst into a few batches); without grouping it is 60.
    assert 1 <= commits <= 20, commits
    assert spool.stats.largest_batch >= 6
    for i, qid in enumerate(ids):
        msg = await spool.get(qid)
        assert msg is not None and msg.recipients[0].rcpt == f"r{i}@example.org"


def _occupy(running: threading.Event, seconds: float, conn: sqlite3.Connection) -> None:
    """A writer operation that says when it starts, then keeps the writer busy."""
    running.set()
    time.sleep(seconds)


async def test_a_busy_writer_gathers_later_operations_into_its_commit(tmp_path: Path) -> None:
    """Two operations queued together (behind a slow one) make the writer wait
    (commit_gather) for more: one that arrives meanwhile shares their commit. Without the
    wait it takes a commit of its own."""
    for gather, commits_expected in ((2.0, 2), (0.0, 3)):
        spool = await Spool.open(tmp_path / f"spool-{gather}", commit_gather=gather)
        try:
            before = spool.stats.commits
            running = threading.Event()
            busy = spool._writer.submit(functools.partial(_occupy, running, 0.2))  # alone
            assert await asyncio.to_thread(running.wait, 10.0)
            first = asyncio.gather(put(spool), put(spool))  # queued together behind it
            await asyncio.sleep(0.6)  # the slow one is done, the two were taken together
            third = await put(spool)
            await asyncio.gather(busy, first)
            assert spool.stats.commits - before == commits_expected
            assert await spool.get(third) is not None
        finally:
            await spool.close()


def _change_then_fail(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO webhook_cursors (endpoint, acked, updated_at) VALUES ('half-done', 1, 0)"
    )
    raise ValueError("failed after changing a row")


def _fail_at_once(conn: sqlite3.Connection) -> None:
    raise ValueError("failed before changing anything")


@pytest.mark.parametrize("failing", [_fail_at_once, _change_then_fail])
async def test_an_operation_that_fails_fails_alone_in_its_batch(
    tmp_path: Path, failing: Any
) -> None:
    """Operations of one batch around a failing one are committed; the failing one's
    caller gets its error and none of its changes are kept, whether it failed before
    changing anything or after (then the batch is run again, a SAVEPOINT per operation)."""
    spool = await Spool.open(tmp_path / "spool", commit_gather=0.0)
    try:
        running = threading.Event()
        busy = spool._writer.submit(functools.partial(_occupy, running, 0.2))
        assert await asyncio.to_thread(running.wait, 10.0)
        before = spool.stats.commits
        results = await asyncio.gather(  # queued together behind the busy one: one batch
            put(spool), spool._writer.submit(failing), put(spool), return_exceptions=True
        )
        await busy
        assert isinstance(results[1], ValueError)
        ids = [r for r in results if isinstance(r, str)]
        assert len(ids) == 2
        assert spool.stats.commits - before == 2  # the busy one's, and the batch's
        assert spool.stats.largest_batch >= 3
        for qid in ids:
            assert await spool.get(qid) is not None
        assert "half-done" not in await spool.events.cursors()
    finally:
        await spool.close()
    reopened = await Spool.open(tmp_path / "spool")
    try:
        assert sorted(m.queue_id for m in reopened.iter_pending()) == sorted(ids)
    finally:
        await reopened.close()


async def test_a_lone_operation_never_waits_for_company(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool", commit_gather=5.0)
    try:
        started = time.monotonic()
        await put(spool)
        assert time.monotonic() - started < 2.5  # far below the 5 s it would wait
    finally:
        await spool.close()


async def test_the_writer_thread_runs_under_sched_batch_and_the_loop_does_not(spool: Spool) -> None:
    # The writer must not preempt the event loop on each wake-up (writer.batch_scheduling);
    # the policy is per thread: the loop's own thread keeps the default.
    await put(spool)  # the writer has started and taken its policy
    writer_tid = spool._writer._thread.native_id
    assert writer_tid is not None
    assert os.sched_getscheduler(writer_tid) == os.SCHED_BATCH
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER


async def test_a_refused_sched_batch_is_said_once_and_the_spool_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A seccomp filter without sched_setscheduler answers EPERM (the kernel is faked here).
    def refuse(pid: int, policy: int, param: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    caplog.set_level("INFO", logger="relay.spool")
    spool = await Spool.open(tmp_path / "spool")
    try:
        qid = await put(spool)
        assert await spool.get(qid) is not None
        tid = spool._writer._thread.native_id
        assert tid is not None and os.sched_getscheduler(tid) == os.SCHED_OTHER
    finally:
        await spool.close()
    said = [r.getMessage() for r in caplog.records if "SCHED_BATCH refused" in r.getMessage()]
    assert len(said) == 1 and "Operation not permitted" in said[0]


@pytest.mark.parametrize(("setting", "seconds"), [("0s", 0.0), ("20ms", 0.02)])
async def test_spool_commit_gather_reaches_the_running_spool(
    tmp_path: Path, setting: str, seconds: float
) -> None:
    # relay.yaml -> Relay.start -> Spool.open -> the writer (not only the default, 2 ms).
    path = RelayConfig(tmp_path / "relay", spool={"path": "spool", "commit_gather": setting}).write()
    node = Relay(load_config(str(path)), str(path))
    await node.start()
    try:
        assert node.spool._writer._gather == seconds
    finally:
        await node.stop()


# --- update / hold / delete ----------------------------------------------------------------


async def test_update_records_outcomes_and_deletes_when_nothing_pending(spool: Spool) -> None:
    qid = await put(spool, rcpts=("b@example.org", "c@example.org", "d@example.org"))
    retry = RecipientUpdate("c@example.org", RcptStatus.PENDING, 1, 5000.0, "451 4.7.1 later")
    await spool.update(qid, [done("b@example.org"), retry], upstream="mailjet")
    msg = await spool.get(qid)
    assert msg is not None and msg.upstream == "mailjet"
    assert [(r.status, r.attempts, r.next_attempt, r.last_reply) for r in msg.recipients] == [
        (RcptStatus.DELIVERED, 1, 0.0, "250 2.0.0 ok"),
        (RcptStatus.PENDING, 1, 5000.0, "451 4.7.1 later"),
        (RcptStatus.PENDING, 0, 0.0, ""),
    ]
    assert [r.rcpt for r in msg.pending] == ["c@example.org", "d@example.org"]
    assert (await spool.summary())["recipients_pending"] == 2

    await spool.update(
        qid, [done("c@example.org", RcptStatus.BOUNCED), done("d@example.org", RcptStatus.EXPIRED)]
    )
    assert await spool.get(qid) is None
    with pytest.raises(KeyError):
        await spool.read_body(qid)
    assert (await spool.summary())["messages"] == 0
    assert [m.queue_id for m in spool.iter_pending()] == []
    # The body went with the message: nothing orphaned.
    other = sqlite3.connect(spool.db_path)
    try:
        assert other.execute("SELECT count(*) FROM bodies").fetchone()[0] == 0
    finally:
        other.close()


async def test_hold_release_and_delete(spool: Spool) -> None:
    qid = await put(spool)
    assert await spool.set_held(qid, held=True) is True
    msg = await spool.get(qid)
    assert msg is not None and msg.held
    assert (await spool.summary())["held"] == 1
    assert await spool.set_held(qid, held=False) is True
    msg = await spool.get(qid)
    assert msg is not None and not msg.held
    assert await spool.delete(qid) is True
    assert await spool.get(qid) is None
    assert await spool.delete(qid) is False


async def test_fire_and_forget_updates_are_flushed_by_close(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path)
    qid = await put(s, rcpts=("b@example.org", "c@example.org"))
    task = asyncio.create_task(s.update(qid, [done("b@example.org")]))
    await asyncio.sleep(0)  # the task submits its write; close must then commit it
    await s.close()
    assert task.done() and task.exception() is None
    s = await Spool.open(tmp_path)
    try:
        [msg] = list(s.iter_pending())
        assert [r.status for r in msg.recipients] == [RcptStatus.DELIVERED, RcptStatus.PENDING]
    finally:
        await s.close()


# --- list / summary / iter_pending -----------------------------------------------------------


async def test_list_filters_and_orders_oldest_first(spool: Spool) -> None:
    a = await put(spool, org="acme", account="x@acme.test", upstream="sendgrid", received_at=30.0)
    b = await put(spool, org="acme", account="y@acme.test", upstream="mailjet", received_at=10.0)
    c = await put(spool, org="beta", account="z@beta.test", upstream="sendgrid", received_at=20.0)

    def ids(messages: list[SpoolMessage]) -> list[str]:
        return [m.queue_id for m in messages]

    assert ids(await spool.list()) == [b, c, a]
    assert ids(await spool.list(org="acme")) == [b, a]
    assert ids(await spool.list(account="z@beta.test")) == [c]
    assert ids(await spool.list(upstream="sendgrid")) == [c, a]
    assert ids(await spool.list(older_than=25.0)) == [b, c]
    assert ids(await spool.list(org="acme", upstream="sendgrid")) == [a]
    assert ids(await spool.list(limit=2)) == [b, c]
    assert ids(await spool.list(org="nobody")) == []


async def test_summary_groups_by_upstream_and_org(spool: Spool) -> None:
    await put(
        spool, org="acme", upstream="sendgrid", rcpts=("1@x.test", "2@x.test"), received_at=5.0
    )
    held = await put(spool, org="acme", upstream="mailjet", received_at=7.0)
    await put(spool, org="beta", upstream="sendgrid", received_at=3.0)
    await spool.set_held(held, held=True)
    s = await spool.summary()
    assert (s["messages"], s["recipients_pending"], s["held"], s["oldest_received_at"]) == (
        3,
        4,
        1,
        3.0,
    )
    assert s["by_upstream"] == {
        "sendgrid": {"messages": 2, "recipients_pending": 3, "held": 0, "oldest_received_at": 3.0},
        "mailjet": {"messages": 1, "recipients_pending": 1, "held": 1, "oldest_received_at": 7.0},
    }
    assert s["by_org"] == {
        "acme": {"messages": 2, "recipients_pending": 3, "held": 1, "oldest_received_at": 5.0},
        "beta": {"messages": 1, "recipients_pending": 1, "held": 0, "oldest_received_at": 3.0},
    }


async def test_summary_of_empty_spool(spool: Spool) -> None:
    assert await spool.summary() == {
        "messages": 0,
        "recipients_pending": 0,
        "held": 0,
        "oldest_received_at": None,
        "by_upstream": {},
        "by_org": {},
    }


async def test_iter_pending_streams_every_unfinished_message(spool: Spool) -> None:
    ids = [await put(spool, rcpts=(f"{i}@x.test", "z@x.test")) for i in range(3)]
    # Enough rows to cross the recovery page size (1000) without slow puts.
    conn = sqlite3.connect(spool.db_path)
    with conn:
        conn.executemany(
            "INSERT INTO messages (queue_id, received_at, sender, client, org, account,"
            " upstream, size, held, is_dsn, pending, recipients)"
            " VALUES (?, 1.0, '', 'c', 'o', 'a', 'u', 0, 0, 0, 1, ?)",
            [(f"BULK{i:012d}", '[["r@x.test","pending",0,0.0,""]]') for i in range(2500)],
        )
    conn.close()
    await spool.update(ids[1], [done("1@x.test"), done("z@x.test")])
    seen = [m.queue_id for m in spool.iter_pending()]
    assert len(seen) == len(set(seen)) == 2502
    assert ids[0] in seen and ids[2] in seen and ids[1] not in seen


# --- close / lock / cancellation --------------------------------------------------------------


async def test_close_commits_what_was_queued_and_refuses_more(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path)
    tasks = [asyncio.create_task(put(s, rcpts=(f"{i}@x.test",))) for i in range(20)]
    await asyncio.sleep(0)  # let every task submit its put (a scheduling step, not a wait)
    await s.close()
    ids = [t.result() for t in tasks]
    with pytest.raises(SpoolError) as err:
        await put(s)
    assert to_reply(err.value).startswith("451 4.3.0")
    s = await Spool.open(tmp_path)
    try:
        assert {m.queue_id for m in s.iter_pending()} == set(ids)
    finally:
        await s.close()


async def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    s = await Spool.open(tmp_path)
    try:
        with pytest.raises(SpoolError, match="in use"):
            await Spool.open(tmp_path)
    finally:
        await s.close()
    again = await Spool.open(tmp_path)  # released by close
    await again.close()


async def test_cancelled_put_does_not_break_the_writer(spool: Spool) -> None:
    task = asyncio.create_task(put(spool))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    qid = await put(spool)
    assert await spool.get(qid) is not None


async def test_a_version_1_spool_gets_its_due_column_from_the_recipients(tmp_path: Path) -> None:
    from relay.spool import RecipientUpdate

    spool = await Spool.open(tmp_path)
    deferred = await spool.put(
        sender="a@x",
        recipients=["r@y", "s@y"],
        data=b"x",
        client="c",
        org="o",
        account="a",
        upstream="u",
    )
    await spool.update(
        deferred,
        [
            RecipientUpdate("r@y", RcptStatus.PENDING, 1, 5000.0, "451"),
            RecipientUpdate("s@y", RcptStatus.PENDING, 1, 7000.0, "451"),
        ],
    )
    fresh = await spool.put(
        sender="a@x", recipients=["t@y"], data=b"x", client="c", org="o", account="a", upstream="u"
    )
    await spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")  # back to how version 1 stored it
    conn.executescript(
        "DROP INDEX messages_due; ALTER TABLE messages DROP COLUMN due; PRAGMA user_version=1;"
    )
    conn.close()
    spool = await Spool.open(tmp_path)
    try:
        batch = await spool.due(None, 10)
        assert [(due, m.queue_id) for due, m in batch.messages] == [
            (0.0, fresh),
            (5000.0, deferred),
        ]
        assert batch.exhausted
    finally:
        await spool.close()


async def test_named_schema_steps_run_once_each_across_reopens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def count(conn: sqlite3.Connection) -> None:
        calls.append("counted")
        conn.execute("CREATE TABLE step_probe (x INTEGER)")

    # The real steps stay (the spool needs their tables and columns), two probes follow.
    probes: list[schema.Step] = [("probe-table", count), ("probe-sql", "CREATE TABLE p2 (y)")]
    real = list(schema.STEPS)
    monkeypatch.setattr(schema, "STEPS", [*real, *probes])
    for _ in range(2):
        spool = await Spool.open(tmp_path / "spool")
        await spool.close()
    assert calls == ["counted"]
    conn = schema.connect(tmp_path / "spool" / schema.DB_NAME)
    names = [r[0] for r in conn.execute("SELECT name FROM schema_steps ORDER BY name")]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert sorted(names) == sorted(name for name, _ in [*real, *probes])
    assert {"step_probe", "p2"} <= tables


async def test_age_shape_counts_each_message_in_its_bucket_by_group(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool")
    try:
        for org, upstream in (("a", "u1"), ("a", "u2"), ("b", "u1")):
            await spool.put(sender="s@x.test", recipients=["r@y.test"], data=b"x\r\n",
                            client="t", org=org, account="s@x.test", upstream=upstream)
        put_at = time.time()
        edges = [300.0, 600.0, 1200.0]
        assert await spool.age_shape(by="org", edges=edges, now=put_at) == {
            "a": [2, 0, 0, 0], "b": [1, 0, 0, 0]}
        # Seven minutes later they are 5-10 minutes old; an hour later, older than the last edge.
        assert await spool.age_shape(by="upstream", edges=edges, now=put_at + 420) == {
            "u1": [0, 2, 0, 0], "u2": [0, 1, 0, 0]}
        assert await spool.age_shape(by="upstream", edges=edges, now=put_at + 3600) == {
            "u1": [0, 0, 0, 2], "u2": [0, 0, 0, 1]}
        with pytest.raises(ValueError):
            await spool.age_shape(by="sender", edges=edges, now=put_at)
    finally:
        await spool.close()


async def test_an_operator_read_in_progress_never_holds_up_a_delivery(tmp_path: Path) -> None:
    # A summary over a million queued messages takes ~0.3 s (RESULTS.md §12); with one read
    # connection, every status-page refresh and metrics scrape stalled the body reads of
    # deliveries that long. Operator reads now have their own connection, both ways round.
    spool = await Spool.open(tmp_path / "s", body_cache_bytes=0)
    try:
        qid = await spool.put(sender="a@x.example", recipients=["b@y.example"], data=b"hi\r\n",
                              client="127.0.0.1", org="o", account="a", upstream="u")
        release = threading.Event()

        def slow(conn: sqlite3.Connection) -> int:  # an operator query that takes its time
            release.wait(10)
            return 0

        inspecting = asyncio.ensure_future(spool._inspect(slow))
        await asyncio.sleep(0.05)
        assert (await asyncio.wait_for(spool.read_body(qid), 2)) == b"hi\r\n"
        assert not inspecting.done()
        release.set()
        await inspecting

        release.clear()
        delivering = asyncio.ensure_future(spool._read(slow))  # a slow read on the mail path
        await asyncio.sleep(0.05)
        summary = await asyncio.wait_for(spool.summary(), 2)
        assert summary["messages"] == 1 and not delivering.done()
        release.set()
        await delivering
    finally:
        await spool.close()


def _scanned_summary(db: Path) -> dict[str, dict[str, tuple[int, int, int, float]]]:
    """The summary as a whole scan of the messages table computes it (the reference)."""
    conn = sqlite3.connect(db)
    try:
        return {
            kind: {
                str(name): (int(n), int(p), int(h), float(oldest))
                for name, n, p, h, oldest in conn.execute(
                    f"SELECT {kind}, count(*), total(pending), total(held), min(received_at)"
                    f" FROM messages GROUP BY {kind}"
                )
            }
            for kind in ("upstream", "org")
        }
    finally:
        conn.close()


def _as_groups(s: dict[str, Any]) -> dict[str, dict[str, tuple[int, int, int, float]]]:
    return {
        kind: {
            name: (g["messages"], g["recipients_pending"], g["held"], g["oldest_received_at"])
            for name, g in s[f"by_{kind}"].items()
        }
        for kind in ("upstream", "org")
    }


async def test_summary_counts_follow_every_change_without_scanning_the_queue(
    tmp_path: Path,
) -> None:
    # A million queued messages took ~0.3 s to count by scanning two indexes (RESULTS.md
    # §12): the counts are now kept per upstream and organisation as rows change. Every
    # kind of change, in a random order, must leave them equal to a full scan's.
    import random

    rnd = random.Random(7)
    spool = await Spool.open(tmp_path / "s")
    try:
        live: list[str] = []
        for step in range(400):
            op = rnd.random()
            if op < 0.45 or not live:
                rcpts = tuple(f"r{step}-{i}@x.test" for i in range(rnd.randint(1, 3)))
                live.append(await put(spool, rcpts=rcpts, org=rnd.choice(["a", "b", "c"]),
                                      upstream=rnd.choice(["u1", "u2"]),
                                      received_at=float(rnd.randint(1, 1000))))
                continue
            qid = rnd.choice(live)
            m = await spool.get(qid)
            assert m is not None
            pending = [r.rcpt for r in m.recipients if r.status is RcptStatus.PENDING]
            if op < 0.65:  # one recipient delivered, maybe the last
                await spool.update(qid, [done(pending[0])])
                if len(pending) == 1:
                    live.remove(qid)
            elif op < 0.75:  # deferred: still pending
                await spool.update(qid, [RecipientUpdate(pending[0], RcptStatus.PENDING, 1,
                                                         5.0, "451 later")])
            elif op < 0.85:
                await spool.set_held(qid, held=not m.held)
            elif op < 0.92:  # re-routed (failover, a reload)
                await spool.update(qid, [], upstream=rnd.choice(["u1", "u2", "u3"]))
            else:
                assert await spool.delete(qid)
                live.remove(qid)
            if step % 40 == 0:
                assert _as_groups(await spool.summary()) == _scanned_summary(spool.db_path)
        assert _as_groups(await spool.summary()) == _scanned_summary(spool.db_path)
        scanned_up = _scanned_summary(spool.db_path)["upstream"]
        assert await spool.count() == (sum(v[0] for v in scanned_up.values()),
                                       sum(v[2] for v in scanned_up.values()))
        assert await spool.depth() == {u: (v[0], v[3]) for u, v in scanned_up.items()}
        # The kept counts themselves (what the summary reads instead of the queue).
        kept = sqlite3.connect(spool.db_path).execute(
            "SELECT kind, name, messages, pending, held FROM queue_counts WHERE messages > 0"
        ).fetchall()
        scanned = _scanned_summary(spool.db_path)
        assert {(k, n, m, p, h) for k, n, m, p, h in kept} == {
            (kind, name, v[0], v[1], v[2]) for kind, g in scanned.items() for name, v in g.items()
        }
    finally:
        await spool.close()


async def test_summary_counts_of_a_spool_written_before_they_existed(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "s")
    for i in range(5):
        await put(spool, org=f"o{i % 2}", upstream=f"u{i % 3}", received_at=float(10 - i))
    await spool.close()
    conn = sqlite3.connect(tmp_path / "s" / "spool.db")  # as an older version left it
    conn.executescript("DROP TRIGGER queue_counts_insert; DROP TRIGGER queue_counts_delete;"
                       " DROP TRIGGER queue_counts_update; DROP TABLE queue_counts;"
                       " DELETE FROM schema_steps WHERE name = 'queue-counts';")
    conn.execute("INSERT INTO messages (queue_id, received_at, sender, client, org, account,"
                 " upstream, size, held, is_dsn, pending, recipients, due) SELECT"
                 " '0000000000000001', 1.0, sender, client, 'o9', account, 'u9', size, 1,"
                 " is_dsn, pending, recipients, due FROM messages LIMIT 1")
    conn.commit()
    conn.close()
    spool = await Spool.open(tmp_path / "s")
    try:
        assert _as_groups(await spool.summary()) == _scanned_summary(spool.db_path)
        assert (await spool.summary())["by_org"]["o9"]["held"] == 1
    finally:
        await spool.close()
