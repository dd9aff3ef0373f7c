"""relay/scheduler/outcomes.py with a real spool and a real mail log: an outcome's mail-log
line, its metric and the operator's last hour say only what the spool has recorded."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest

from relay.core.errors import SpoolError
from relay.core.model import (
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


async def test_the_mail_log_says_delivered_once_the_spool_has_it(tmp_path: Path) -> None:
    spool = await Spool.open(tmp_path / "spool")
    log = MailLog(str(tmp_path / "mail.log"))
    try:
        recorder = Recorder(spool, log, RetryPolicy((60.0,)), clock=time.time,
                            rand=random.Random(1))
        e = await _entry(spool)
        out = await recorder.record(e, UPSTREAM, SOURCE, RESULTS, data=BODY)
        log.flush()
        lines = _lines(tmp_path / "mail.log")
        assert [(x["event"], x["recipient"]) for x in lines] == [
            ("delivered", "x@dest.test"), ("deferred", "y@dest.test")]
        assert lines[0]["reply"] == "250 2.0.0 queued as 7"
        assert out.next_due is not None and e.pending == {"y@dest.test": 1}
        # ... and the spool has it: one recipient left.
        m = await spool.get(e.queue_id)
        assert m is not None and [r.rcpt for r in m.pending] == ["y@dest.test"]
    finally:
        log.close()
        await spool.close()


async def test_an_outcome_the_spool_could_not_record_is_not_in_the_mail_log(
    tmp_path: Path,
) -> None:
    """The scheduler tries such a message again (the spool still says pending): a line
    written before the spool had it would say `delivered` twice for one delivery, or
    `delivered` for a message the relay then delivers again."""
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
        assert _lines(tmp_path / "mail.log") == []
        assert log.activity.totals["delivered"] == log.activity.totals["deferred"] == 0
    finally:
        log.close()
