"""Recording an attempt's outcome: each recipient's next state (delivered, bounced, expired,
or pending with its next attempt), written to the spool in one update together with one
event per recipient (relay.notify: in the same transaction), and one mail-log line each
once the spool has answered."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay.core.model import Disposition, EgressSource, Outcome, RecipientResult, Reply, Upstream
from relay.delivery.replyclass import reply_class
from relay.events import MailLog
from relay.notify import model as ev
from relay.scheduler.entry import Entry
from relay.scheduler.retry import RetryPolicy
from relay.spool import EventRow, RcptStatus, RecipientUpdate, Spool

log = logging.getLogger("relay.scheduler")

_EVENT_TYPE = {
    RcptStatus.DELIVERED: ev.DELIVERED,
    RcptStatus.BOUNCED: ev.BOUNCED,
    RcptStatus.EXPIRED: ev.EXPIRED,
    RcptStatus.PENDING: ev.DEFERRED,
}
_FINAL_EVENT = {
    RcptStatus.DELIVERED: Disposition.DELIVERED,
    RcptStatus.BOUNCED: Disposition.BOUNCED,
    RcptStatus.EXPIRED: Disposition.EXPIRED,
}


@dataclass
class Recorded:
    """What an attempt left to do: the recipients to report to the sender (bounced or
    expired: recipient, status, reply), and when the rest is due next (None: none left)."""

    failed: list[tuple[str, str, Reply]] = field(default_factory=list)
    next_due: float | None = None
    some_unanswered: bool = False  # recipients without a result keep their own earlier time
    classes: dict[str, str] = field(default_factory=dict)  # failed recipient -> failure class


class Suppressor(Protocol):
    """Told of every recipient that bounced or expired (relay.notify.suppression): adds it
    to its organisation's suppression list when the organisation asks for that."""

    async def failed(self, org: str, recipient: str, klass: str, reply: Reply,
                     queue_id: str) -> None: ...


class Recorder:
    def __init__(
        self,
        spool: Spool,
        events: MailLog,
        retry: RetryPolicy,
        *,
        clock: Callable[[], float],
        rand: random.Random,
    ) -> None:
        self.spool = spool
        self.events = events
        self.retry = retry
        self.clock = clock
        self.rand = rand
        self.suppressor: Suppressor | None = None

    async def record(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource | None,
        results: Sequence[RecipientResult],
        *,
        data: bytes | None = None,
        operator: str | None = None,
    ) -> Recorded:
        """Write the outcome of one attempt; `e.pending` loses the recipients that are done.
        `data` is the message (for its Message-ID; read from the spool when None);
        `operator` is the reason when an operator bounced it."""
        now = self.clock()
        if data is None:
            try:
                data = await self.spool.read_body(e.queue_id)
            except KeyError:
                data = b""
        message_id = ev.message_id_of(data)
        rows: list[EventRow] = []
        updates: list[RecipientUpdate] = []
        out = Recorded()
        base = {
            "queue_id": e.queue_id,
            "org": e.org,
            "account": e.account,
            "upstream": upstream.id,
            "egress": source.address if source else None,
        }
        if e.via:
            base["failover"] = e.via  # which upstream took it instead, and why
        next_times: list[float] = []
        lines: list[tuple[Disposition, dict[str, Any]]] = []  # written once the spool has answered
        answered = {r.recipient for r in results}
        out.some_unanswered = any(r not in answered for r in e.pending)
        for res in results:
            attempts = e.pending.get(res.recipient, 0) + 1
            fields = dict(
                base,
                recipient=res.recipient,
                attempt=attempts,
                delay=round(now - e.received_at, 3),
                reply=str(res.reply),
            )
            status, when = self.next_state(e, res, attempts, now)
            updates.append(RecipientUpdate(res.recipient, status, attempts, when, str(res.reply)))
            klass = "expired" if status is RcptStatus.EXPIRED else reply_class(res.reply)
            kind = _EVENT_TYPE[status]
            if e.is_dsn and status in (RcptStatus.BOUNCED, RcptStatus.EXPIRED):
                kind = ev.DSN_FAILED
                log.warning("the DSN %s to %s could not be delivered (%s): %s", e.queue_id,
                            res.recipient, status.value, res.reply)
            rows.append(ev.make_event(
                kind, ts=now, queue_id=e.queue_id, org=e.org, account=e.account,
                sender=e.sender, recipient=res.recipient, message_id=message_id,
                reply=res.reply, upstream=upstream.id,
                egress=source.address if source else None, tls=res.tls, attempt=attempts,
                next_attempt=round(when, 3) if status is RcptStatus.PENDING else None,
                dsn=True if e.is_dsn else None, operator=operator,
                failover=e.via or None,  # the upstream that took it instead, and why
                klass=klass,
            ))
            if status is RcptStatus.PENDING:
                lines.append((Disposition.DEFERRED, {**fields, "retry_in": round(when - now, 1)}))
                e.pending[res.recipient] = attempts
                next_times.append(when)
                continue
            lines.append((_FINAL_EVENT[status], fields))
            e.pending.pop(res.recipient, None)
            if status is not RcptStatus.DELIVERED:
                out.failed.append((res.recipient, status.value, res.reply))
                out.classes[res.recipient] = klass
        try:
            await self.spool.update(e.queue_id, updates, upstream=upstream.id, events=rows)
        finally:
            self._say(lines)
        if self.suppressor is not None and not e.is_dsn and operator is None:
            for rcpt, _, reply in out.failed:
                try:
                    await self.suppressor.failed(e.org, rcpt, out.classes[rcpt], reply,
                                                 e.queue_id)
                except Exception:  # the outcome is recorded; the list is a convenience
                    log.exception("could not add %s to the suppression list", rcpt)
        if e.pending:
            out.next_due = min(next_times) if next_times else now
        return out

    async def paused(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource,
        results: Sequence[RecipientResult],
        retry_in: float,
    ) -> None:
        """An attempt that found its upstream needing a person (relay/scheduler/health.py):
        not counted (attempts and due time unchanged), but the reply is kept as the
        recipients' last reply, with an event and a mail-log line each saying `paused`."""
        now = self.clock()
        rows: list[EventRow] = []
        updates: list[RecipientUpdate] = []
        lines: list[tuple[Disposition, dict[str, Any]]] = []
        for res in results:
            why = res.pause
            attempts = e.pending.get(res.recipient, 0)
            updates.append(RecipientUpdate(res.recipient, RcptStatus.PENDING, attempts, now,
                                           str(res.reply)))
            rows.append(ev.make_event(
                ev.DEFERRED, ts=now, queue_id=e.queue_id, org=e.org, account=e.account,
                sender=e.sender, recipient=res.recipient, reply=res.reply,
                upstream=upstream.id, egress=source.address, tls=res.tls, attempt=attempts,
                next_attempt=round(now + retry_in, 3), dsn=True if e.is_dsn else None,
                operator=None, klass=why.kind if why else reply_class(res.reply),
            ))
            lines.append((Disposition.DEFERRED, dict(
                queue_id=e.queue_id, org=e.org, account=e.account,
                upstream=upstream.id, egress=source.address, recipient=res.recipient,
                attempt=attempts, reply=str(res.reply), paused=why.kind if why else None,
                next_step=why.next_step if why else None, retry_in=retry_in,
            )))
        try:
            await self.spool.update(e.queue_id, updates, upstream=upstream.id, events=rows)
        finally:
            self._say(lines)

    def _say(self, lines: list[tuple[Disposition, dict[str, Any]]]) -> None:
        """The mail-log lines (with their metrics and the operator's last hour) of an
        attempt, once the spool has answered: whoever reads a line then finds the queue
        saying the same. An outcome the spool could not record still gets its lines (the
        attempt happened, and the operator should see it; the message is tried again)."""
        for disposition, fields in lines:
            self.events.emit(disposition, **fields)

    def next_state(
        self, e: Entry, res: RecipientResult, attempts: int, now: float
    ) -> tuple[RcptStatus, float]:
        """A recipient's state after this attempt, and when to try it next (0 when final)."""
        if res.outcome is Outcome.DELIVERED:
            return RcptStatus.DELIVERED, 0.0
        if res.outcome is Outcome.BOUNCED:
            return RcptStatus.BOUNCED, 0.0
        when = self.retry.next_attempt(
            now=now, received_at=e.received_at, failures=attempts, rand=self.rand.random()
        )
        return (RcptStatus.EXPIRED, 0.0) if when is None else (RcptStatus.PENDING, when)
