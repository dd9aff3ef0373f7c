"""Recording an attempt's outcome: each recipient's next state (delivered, bounced, expired,
or pending with its next attempt), written to the spool in one update, with one mail-log
line per recipient."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from relay.core.model import Disposition, EgressSource, Outcome, RecipientResult, Reply, Upstream
from relay.events import MailLog
from relay.scheduler.entry import Entry
from relay.scheduler.retry import RetryPolicy
from relay.spool import RcptStatus, RecipientUpdate, Spool

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

    async def record(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource | None,
        results: Sequence[RecipientResult],
    ) -> Recorded:
        """Write the outcome of one attempt; `e.pending` loses the recipients that are done."""
        now = self.clock()
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
            if status is RcptStatus.PENDING:
                self.events.emit(Disposition.DEFERRED, **fields, retry_in=round(when - now, 1))
                e.pending[res.recipient] = attempts
                next_times.append(when)
                continue
            self.events.emit(_FINAL_EVENT[status], **fields)
            e.pending.pop(res.recipient, None)
            if status is not RcptStatus.DELIVERED:
                out.failed.append((res.recipient, status.value, res.reply))
        await self.spool.update(e.queue_id, updates, upstream=upstream.id)
        if e.pending:
            out.next_due = min(next_times) if next_times else now
        return out

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
