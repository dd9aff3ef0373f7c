"""Issue 13 below the process level: reply classes (table), events in the spool transaction of
their change, the outbox bounds (the rule when full), signatures, pruning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.config import load_config
from relay.core.errors import SpoolError
from relay.core.model import Reply
from relay.delivery.outcome import enhanced_code
from relay.delivery.replyclass import CLASSES, reply_class
from relay.notify import model as ev
from relay.notify.signing import sign, verify
from relay.notify.suppression import _Local
from relay.notify.webhook import WebhookSender
from relay.spool import RcptStatus, RecipientUpdate, Spool
from tests.together import failures_together


def R(code: int, text: str) -> Reply:
    return Reply(code, text, enhanced_code(code, text))


@pytest.mark.parametrize(("code", "text", "klass"), [
    (250, "2.0.0 OK", ""),
    (550, "5.1.1 No such user", "hard"),
    (550, "Requested action not taken: mailbox unavailable", "hard"),
    (553, "5.1.3 bad address syntax", "hard"),
    (451, "4.3.0 try later", "soft"),
    (450, "mailbox busy", "soft"),
    (535, "5.7.8 Authentication credentials invalid", "auth"),
    (530, "5.7.0 Authentication required", "auth"),
    (454, "4.7.5 TLS certificate verification failed for mx.test", "tls"),
    (454, "4.7.10 mx.test does not offer STARTTLS; not sending in plaintext", "tls"),
    (451, "4.4.3 mx.test does not resolve", "dns"),
    (550, "5.1.2 bad destination domain", "dns"),
    (451, "4.4.1 connection refused by 127.0.0.1:25", "network"),
    (451, "4.4.2 connection lost during DATA", "network"),
    (452, "4.2.2 Mailbox full", "quota"),
    (552, "5.2.2 The email account that you tried to reach is over quota", "quota"),
    (421, "4.7.0 Too many connections, slow down", "rate"),
    (451, "4.7.1 rate limited, try again later", "rate"),
    (550, "5.7.1 Message rejected as spam", "spam"),
    (554, "5.7.1 Service unavailable; client host blocked using Spamhaus", "spam"),
    (550, "5.7.1 Sender address not allowed", "policy"),
    (550, "5.7.26 DMARC policy violation", "policy"),
])
def test_reply_class(code: int, text: str, klass: str) -> None:
    got = reply_class(R(code, text))
    assert got == klass
    assert got == "" or got in CLASSES


async def test_events_commit_with_their_change_or_not_at_all(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        row = ev.make_event(ev.RECEIVED, queue_id="Q1", org="acme", sender="a@b.test")
        qid = await spool.put(sender="a@b.test", recipients=["x@y.test"], data=b"S: x\r\n\r\nhi",
                              client="c", org="acme", account="a@b.test", upstream="u",
                              queue_id="0000000000000001", events=[row])
        # A put whose event cannot be written (the same event id again) keeps nothing at all.
        with pytest.raises(SpoolError):
            await spool.put(sender="a@b.test", recipients=["x@y.test"], data=b"S: x\r\n\r\nhi",
                            client="c", org="acme", account="a@b.test", upstream="u",
                            queue_id="0000000000000002", events=[row])
        assert await spool.get("0000000000000002") is None
        done = ev.make_event(ev.DELIVERED, queue_id=qid, recipient="x@y.test")
        await spool.update(qid, [RecipientUpdate("x@y.test", RcptStatus.DELIVERED, 1, 0, "250")],
                           events=[done])
        # An update of a message that is gone (deleted meanwhile) records no event either.
        ghost = ev.make_event(ev.DELIVERED, queue_id="GONE", recipient="x@y.test")
        await spool.update("GONE", [], events=[ghost])
        stored = await spool.events.after(0, 10)
        assert [(e.seq, e.row.type) for e in stored] == [(1, "received"), (2, "delivered")]
        assert json.loads(stored[1].row.data)["queue_id"] == qid
        assert await spool.get(qid) is None
    finally:
        await spool.close()


async def test_a_full_outbox_skips_the_oldest_counts_and_logs_them(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg_dir = tmp_path / "cfg"
    (cfg_dir / "policies").mkdir(parents=True)
    (cfg_dir / "relay.yaml").write_text(
        "webhooks:\n  p:\n    url: https://127.0.0.1:9/hook\n    secret: env:NOPE\n"
        "    max_backlog: 5\n    max_age: 1h\n")
    config = load_config(str(cfg_dir), environ={})
    spool = await Spool.open(tmp_path / "spool")
    now = time.time()
    sender = WebhookSender(spool, CollectorRegistry(), "n/w0", config, clock=lambda: now)
    try:
        await spool.events.set_cursor("p", 0)
        await sender._apply(config)  # states and cursors, without the sending tasks
        for st in sender.states.values():
            assert st.task is not None
            st.task.cancel()
        old = [ev.make_event(ev.RECEIVED, queue_id=f"Q{i}", ts=now - 7200) for i in range(2)]
        new = [ev.make_event(ev.DELIVERED, queue_id=f"Q{i}", ts=now - 10) for i in range(8)]
        await spool.events.add(old + new)
        st = sender.states["p"]
        await sender.check(st)
        # 10 waiting, at most 5 and none older than 1h: the 5 oldest are skipped.
        assert (st.acked, st.depth, st.dropped) == (5, 5, 5)
        assert "outbox full" in caplog.text and "seq 1-5" in caplog.text
        assert await spool.events.cursors() == {"p": 5}
        # Replay from a time brings them back into the outbox.
        await sender.replay("p", since=now - 3 * 3600)
        await sender.check(st)  # still over max_backlog: the rule holds
        assert st.acked == 5
    finally:
        await sender.close()
        await spool.close()


async def test_events_are_pruned_after_retention_and_beyond_the_count(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path)
    try:
        now = time.time()
        rows = [ev.make_event(ev.RECEIVED, queue_id=f"Q{i}", ts=now - 8 * 86400) for i in range(3)]
        rows += [ev.make_event(ev.RECEIVED, queue_id=f"N{i}", ts=now) for i in range(5)]
        await spool.events.add(rows)
        assert await spool.events.prune(now - 7 * 86400, 4, None) == 4
        last, kept, _ = await spool.events.stats()
        assert (last, kept) == (8, 4)
        await spool.events.add([ev.make_event(ev.RECEIVED, queue_id="Z")])
        assert (await spool.events.after(7, 10))[-1].seq == 9  # seqs are never reused
    finally:
        await spool.close()


def test_signature_round_trip_and_refusals() -> None:
    body = b'{"events":[]}'
    sig = sign("k" * 16, 1_700_000_000, body)
    assert sig.startswith("v1=") and len(sig) == 3 + 64
    assert verify("k" * 16, "1700000000", body, sig, now=1_700_000_100)
    assert verify("k" * 16, "1700000000", body, "v1=old," + sig, now=1_700_000_100)
    assert not verify("k" * 16, "1700000000", body + b" ", sig, now=1_700_000_100)
    assert not verify("x" * 16, "1700000000", body, sig, now=1_700_000_100)
    assert not verify("k" * 16, "1700000000", body, sig, now=1_700_001_000)  # too old
    assert not verify("k" * 16, "soon", body, sig, now=1_700_000_000)


def test_message_ids_and_redacted_replies_in_events() -> None:
    assert ev.message_id_of(b"Subject: a\r\nMessage-ID:\r\n <m@x>\r\n\r\nMessage-ID: <no>") == "m@x"
    assert ev.message_id_of(b"Subject: a\r\n\r\nMessage-ID: <no>") == ""
    row = ev.make_event(ev.DEFERRED, queue_id="Q", reply=Reply(535, "5.7.8 AUTH PLAIN AGFiYwBk bad"))
    assert "AGFiYwBk" not in row.data and json.loads(row.data)["reply"]["code"] == 535


def test_workers_opening_a_new_suppression_list_together_never_see_database_locked(
    tmp_path: Path,
) -> None:
    # Found in a full run: two workers starting at once, one failed with "database is
    # locked" switching the new file to WAL. 4 processes x 15 fresh files failed 8 in 160
    # opens before the set-up took a lock; now 8 processes x 25 files.
    paths = [str(tmp_path / f"s{i}" / "suppression.db") for i in range(25)]
    assert failures_together(lambda path: _Local(Path(path)), paths) == 0
