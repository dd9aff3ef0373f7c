"""relay/scheduler/outcomes.py with a real spool and a real mail log: an outcome's mail-log
line, its metric and the operator's last hour come once the spool has answered."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from relay.core.errors import SpoolError
from relay.core.model import (
    Disposition,
    EgressSource,
    Outcome,
    RecipientResult,
    Reply,
    Throttle,
    TlsMode,
    Upstream,
)
from relay.events import MailLog
from relay.scheduler.entry import Entry
from relay.scheduler.outcomes import Recorder
from relay.scheduler.retry import RetryPolicy
from relay.spool import Spool

SOURCE = EgressSource("pool", "127.0.0.1", "relay.test")
UPSTREAM = Upstream("sink", "mx.test", 25, TlsMode.NONE, "default", throttle=Throttle())
BODY = b"Message-ID: <m1@acme.test>\r\nSubject: hi\r\n\r\nhello\r\n"


async def _entry(spool: Spool) -> Entry:
    queue_id = await spool.put(sender="a@acme.test", recipients=["x@dest.test", "y@dest.test"],
                               data=BODY, client="127.0.0.1", org="acme",
                               account="a@acme.test", upstream="sink")
    return Entry(queue_id=queue_id, sender="a@acme.test", org="acme", account="a@acme.test",
                 received_at=time.time(), pending={"x@dest.test": 0, "y@dest.test": 0},
                 upstream="sink")


RESULTS = [
    RecipientResult("x@dest.test", Outcome.DELIVERED, Reply(250, "2.0.0 queued as 7")),
    RecipientResult("y@dest.test", Outcome.DEFERRED, Reply(451, "4.3.0 try later")),
]


def _lines(path: Path) -> list[dict[str, object]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


class _Watching(MailLog):
    """A mail log that, as each line is emitted, reads the spool's own database (a separate
    connection: it sees what has committed) for that message's pending recipients."""

    def __init__(self, target: str, db: Path) -> None:
        super().__init__(target)
        self.db = db
        self.seen: list[tuple[str, int | None]] = []

    def emit(self, event: Disposition, **fields: Any) -> None:
        with sqlite3.connect(self.db) as conn:
            row = conn.execute("SELECT pending FROM messages WHERE queue_id = ?",
                               (fields.get("queue_id"),)).fetchone()
        self.seen.append((event.value, None if row is None else int(row[0])))
        super().emit(event, **fields)


@pytest.mark.interpreted  # subclasses MailLog
async def test_a_mail_log_line_comes_once_the_spool_has_the_outcome(tmp_path: Path) -> None:
    """Whoever reads `delivered` in the mail log and then asks the queue finds it there."""
    spool = await Spool.open(tmp_path / "spool")
    log = _Watching(str(tmp_path / "mail.log"), tmp_path / "spool" / "spool.db")
    try:
        recorder = Recorder(spool, log, RetryPolicy((60.0,)), clock=time.time,
                            rand=random.Random(1))
        e = await _entry(spool)
        out = await recorder.record(e, UPSTREAM, SOURCE, RESULTS, data=BODY)
        # Both lines saw one recipient pending: x's delivery was recorded before either.
        assert log.seen == [("delivered", 1), ("deferred", 1)]
        log.flush()
        lines = _lines(tmp_path / "mail.log")
        assert [(x["event"], x["recipient"]) for x in lines] == [
            ("delivered", "x@dest.test"), ("deferred", "y@dest.test")]
        assert lines[0]["reply"] == "250 2.0.0 queued as 7"
        assert out.next_due is not None and e.pending == {"y@dest.test": 1}
        m = await spool.get(e.queue_id)
        assert m is not None and [r.rcpt for r in m.pending] == ["y@dest.test"]
    finally:
        log.close()
        await spool.close()


async def test_an_attempt_the_spool_could_not_record_is_still_in_the_mail_log(
    tmp_path: Path,
) -> None:
    """The attempt happened (the operator should see it, e.g. while the spool is full); the
    message stays pending in the spool and is tried again."""
    spool = await Spool.open(tmp_path / "spool")
    log = MailLog(str(tmp_path / "mail.log"))
    try:
        recorder = Recorder(spool, log, RetryPolicy((60.0,)), clock=time.time,
                            rand=random.Random(1))
        e = await _entry(spool)
        await spool.close()  # every write from now on fails with a SpoolError
        with pytest.raises(SpoolError):
            await recorder.record(e, UPSTREAM, SOURCE, RESULTS, data=BODY)
        with pytest.raises(SpoolError):  # an upstream that needs a person: the same
            await recorder.paused(e, UPSTREAM, SOURCE, RESULTS[1:], 60.0)
        log.flush()
        assert [(x["event"], x["recipient"]) for x in _lines(tmp_path / "mail.log")] == [
            ("delivered", "x@dest.test"), ("deferred", "y@dest.test"),
            ("deferred", "y@dest.test")]
    finally:
        log.close()
