"""Operator actions on the queue (retry, hold, release, delete, bounce) and its views
(summary, list, show), as the admin API and `relay queue` use them.

Every action goes through the scheduler first — so a held message is not started again and a
retried one is dispatched now — and is then written to the spool, so it survives a restart.
The scheduler holds only part of the queue in memory: a message it has not loaded is acted on
in the spool (a retry or release makes it due now, and the scheduler's next refill loads it).
Results are plain dicts (the API's JSON); nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from relay.core.message import header_end
from relay.core.waits import HELD, SPOOLED
from relay.notify import model as ev
from relay.scheduler import ACTIVE, READY, WAITING, Scheduler
from relay.scheduler.why import Why, waiting_summary, why_entry, why_spooled
from relay.spool import EventRow, Spool, SpoolMessage

log = logging.getLogger("relay.queue")

ACTIONS = ("retry", "hold", "release", "delete", "bounce")
_STATES = {WAITING: "waiting", READY: "ready", ACTIVE: "delivering"}
MAX_LIST = 10_000
MAX_HEADER_BYTES = 16_384


@dataclass(frozen=True, slots=True)
class Filters:
    org: str | None = None
    account: str | None = None
    upstream: str | None = None
    older_than: float | None = None  # seconds of age
    limit: int = 1000

    @property
    def empty(self) -> bool:
        return not (self.org or self.account or self.upstream or self.older_than)


class QueueOps:
    def __init__(self, scheduler: Scheduler, spool: Spool) -> None:
        self.scheduler = scheduler
        self.spool = spool

    # -- views ------------------------------------------------------------------------
    async def summary(self) -> dict[str, Any]:
        s = await self.spool.summary()
        now = time.time()

        def age(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 1)

        s["oldest_age"] = age(s.get("oldest_received_at"))
        for group in ("by_upstream", "by_org"):
            for g in s[group].values():
                g["oldest_age"] = age(g.get("oldest_received_at"))
        # Upstreams paused for a person: why mail waits, and what to do (scheduler/health.py)
        s["paused_upstreams"] = self.scheduler.health.snapshot()
        s["waiting"] = self.waiting(s.get("messages", 0), s.get("held", 0), now)
        return s

    def waiting(self, messages: int, held: int, now: float) -> list[dict[str, Any]]:
        """Why the queue's messages wait, grouped (the summary's `waiting`, the metric)."""
        out = waiting_summary(self.scheduler, now)
        loaded = len(self.scheduler.entries)
        held_loaded = sum(1 for e in self.scheduler.entries.values() if e.held)
        held_spooled = max(0, held - held_loaded)
        spooled = max(0, messages - loaded - held_spooled)
        for kind, n, text in (
            (HELD, held_spooled, "held by operator"),
            (SPOOLED, spooled, "in the spool: loaded when the scheduler has room"
                               " (or due later)"),
        ):
            if n:
                out.append({"kind": kind, "upstream": None, "messages": n, "reason": text,
                            "until": None})
        return out

    def why(self, m: SpoolMessage, now: float) -> Why:
        """Why one queued message waits."""
        last = next((r.last_reply for r in m.pending if r.last_reply), None)
        e = self.scheduler.entries.get(m.queue_id)
        if e is not None:
            return why_entry(self.scheduler, e, now, last)
        due = min((r.next_attempt for r in m.pending), default=0.0)
        return why_spooled(m.held, due, now, last)

    async def messages(self, f: Filters) -> list[dict[str, Any]]:
        older = time.time() - f.older_than if f.older_than else None
        rows = await self.spool.list(
            org=f.org,
            account=f.account,
            upstream=f.upstream,
            older_than=older,
            limit=max(1, min(f.limit, MAX_LIST)),
        )
        now = time.time()
        return [self._brief(m) | {"waiting": self.why(m, now).as_dict()} for m in rows]

    async def show(self, queue_id: str) -> dict[str, Any] | None:
        m = await self.spool.get(queue_id)
        if m is None:
            return None
        out = self._brief(m)
        out["waiting"] = self.why(m, time.time()).as_dict()
        out["recipients"] = [
            {
                "recipient": r.rcpt,
                "status": r.status.value,
                "attempts": r.attempts,
                "next_attempt": r.next_attempt or None,
                "last_reply": r.last_reply or None,
            }
            for r in m.recipients
        ]
        e = self.scheduler.entries.get(queue_id)
        out["scheduler"] = (
            {  # not loaded: waiting in the spool for its turn (or held)
                "state": "held" if m.held else "spooled",
                "upstream": m.upstream or None,
                "next_attempt": None,
            }
            if e is None
            else {
                "state": "held" if e.held else _STATES.get(e.state, "?"),
                "upstream": e.upstream or None,
                "next_attempt": e.next_attempt or None,
            }
        )
        try:
            body = await self.spool.read_body(queue_id)
        except KeyError:
            body = b""
        head = body[: min(header_end(body), MAX_HEADER_BYTES)]
        out["headers"] = head.decode("utf-8", "replace")
        return out

    @staticmethod
    def _brief(m: SpoolMessage) -> dict[str, Any]:
        pending = m.pending
        return {
            "queue_id": m.queue_id,
            "received_at": m.received_at,
            "age": round(max(0.0, time.time() - m.received_at), 1),
            "sender": m.sender,
            "org": m.org,
            "account": m.account,
            "upstream": m.upstream,
            "client": m.client,
            "size": m.size,
            "held": m.held,
            "is_dsn": m.is_dsn,
            "pending": [r.rcpt for r in pending],
            "last_reply": next((r.last_reply for r in pending if r.last_reply), None),
        }

    # -- actions ----------------------------------------------------------------------
    async def _event(self, kind: str, queue_id: str, reason: str | None = None) -> list[EventRow]:
        """The operator action's event, from the message as the spool (or memory) has it;
        written with the action's own change."""
        m = await self.spool.get(queue_id)
        if m is not None:
            org, account, sender, rcpts = m.org, m.account, m.sender, [r.rcpt for r in m.pending]
        else:
            e = self.scheduler.entries.get(queue_id)
            if e is None:
                return []
            org, account, sender, rcpts = e.org, e.account, e.sender, list(e.pending)
        return [ev.make_event(kind, queue_id=queue_id, org=org, account=account, sender=sender,
                              recipients=rcpts, operator=reason or "relay administrator")]

    async def act(
        self, action: str, queue_id: str, *, reason: str | None = None
    ) -> tuple[str, str]:
        """(result, text): result is ok | not_found | conflict."""
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        e = self.scheduler.entries.get(queue_id)
        in_flight = e is not None and e.state == ACTIVE
        if action == "hold":
            rows = await self._event(ev.HELD, queue_id, reason)
            known = self.scheduler.hold(queue_id)
            known = await self.spool.set_held(queue_id, held=True, events=rows) or known
            if not known:
                return "not_found", f"{queue_id}: not in the queue"
            log.info("queue: %s held by the operator", queue_id)
            return "ok", "held" + (" (the attempt in progress finishes first)" if in_flight else "")
        if action == "release":
            now = time.time()
            rows = await self._event(ev.RELEASED, queue_id, reason)
            known = await self.spool.set_held(queue_id, held=False, due=now, events=rows)
            if self.scheduler.release(queue_id):
                known = True
            elif known:
                self.scheduler.operator_due(queue_id, now)
            if not known:
                return "not_found", f"{queue_id}: not in the queue"
            log.info("queue: %s released by the operator", queue_id)
            return "ok", "released"
        if action == "retry":
            if e is None:
                return await self._retry_spooled(queue_id)
            if e.held:
                return "conflict", f"{queue_id} is held: release it to deliver it"
            self.scheduler.retry_now(queue_id)
            # The change is the scheduler's (memory): its event stands alone.
            await self.spool.events.add(await self._event(ev.RETRIED, queue_id, reason))
            log.info("queue: %s retried now by the operator", queue_id)
            return "ok", "delivering now" if in_flight else "dispatched now"
        if action == "delete":
            rows = await self._event(ev.DELETED, queue_id, reason)
            known = self.scheduler.forget(queue_id)
            known = await self.spool.delete(queue_id, events=rows) or known
            if not known:
                return "not_found", f"{queue_id}: not in the queue"
            log.warning("queue: %s deleted by the operator (no DSN)", queue_id)
            return "ok", "deleted" + (
                " (an attempt in progress may still deliver it)" if in_flight else ""
            )
        # bounce: every pending recipient bounced with a DSN to the sender (scheduler.bounce)
        if e is None:
            m = await self.spool.get(queue_id)
            e = None if m is None else self.scheduler.adopt(m)
        if e is None:
            return "not_found", f"{queue_id}: not in the queue"
        if in_flight:
            return (
                "conflict",
                f"{queue_id}: a delivery attempt is in progress; try again in a moment",
            )
        text = "5.0.0 " + (reason or "returned to sender by the relay administrator")
        if not await self.scheduler.bounce(queue_id, text):
            return "conflict", f"{queue_id}: could not be bounced now; try again"
        log.warning("queue: %s bounced by the operator", queue_id)
        return (
            "ok",
            "bounced (DSN queued to the sender)" if e.sender else "bounced (null sender: no DSN)",
        )

    async def _retry_spooled(self, queue_id: str) -> tuple[str, str]:
        """Retry of a message the scheduler has not loaded: due now in the spool."""
        m = await self.spool.get(queue_id)
        if m is None or not m.pending:
            return "not_found", f"{queue_id}: not in the queue"
        if m.held:
            return "conflict", f"{queue_id} is held: release it to deliver it"
        return (await self._retry_many_spooled([queue_id]))[queue_id]

    async def _retry_many_spooled(self, ids: list[str]) -> dict[str, tuple[str, str]]:
        """Retry of messages the scheduler has not loaded: due now in the spool (one write per
        thousand), found by the scheduler's next refill in due order."""
        out: dict[str, tuple[str, str]] = {}
        for i in range(0, len(ids), 1000):
            now = time.time()
            done = await self.spool.set_due(ids[i : i + 1000], now, events=_retried)
            for qid, result in done.items():
                if result == "ok":
                    self.scheduler.operator_due(qid, now)
                    out[qid] = ("ok", "dispatched now")
                elif result == "held":
                    out[qid] = ("conflict", f"{qid} is held: release it to deliver it")
                else:
                    out[qid] = ("not_found", f"{qid}: not in the queue")
        n = sum(1 for r, _ in out.values() if r == "ok")
        if n:
            log.info("queue: %d message(s) retried now by the operator", n)
        return out

    async def _matching_ids(self, f: Filters) -> list[str]:
        """Every queued message matching the filters, from the spool (the whole queue, not
        the scheduler's in-memory part): a bulk action covers all of them, not one page."""
        cutoff = time.time() - f.older_than if f.older_than else None
        return await self.spool.ids(
            org=f.org, account=f.account, upstream=f.upstream, older_than=cutoff
        )

    async def act_many(
        self, action: str, ids: list[str] | None, f: Filters, *, reason: str | None = None
    ) -> dict[str, Any]:
        """The action on every listed id, or on every message matching the filters."""
        if ids is None:
            ids = await self._matching_ids(f)
        results = {}
        counts: dict[str, int] = {}
        spooled: dict[str, tuple[str, str]] = {}
        if action == "retry":  # the whole queue may be asked for: not one write per message
            spooled = await self._retry_many_spooled(
                [q for q in ids if q not in self.scheduler.entries]
            )
        for qid in ids:
            if qid in spooled:
                result, text = spooled[qid]
            else:
                result, text = await self.act(action, qid, reason=reason)
            results[qid] = {"result": result, "text": text}
            counts[result] = counts.get(result, 0) + 1
        return {"action": action, "matched": len(ids), "counts": counts, "results": results}


def _retried(queue_id: str, org: str, account: str, sender: str) -> list[EventRow]:
    return [ev.make_event(ev.RETRIED, queue_id=queue_id, org=org, account=account,
                          sender=sender, operator="relay administrator")]
