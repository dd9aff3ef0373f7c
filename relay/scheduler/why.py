"""Why a queued message is still waiting, in words, from the scheduler's state: the
operator views (`relay queue list/show`, the summary, the API) and the
`relay_queue_waiting_messages{reason}` metric.

The upstream's queue keeps the last "not yet" it was given (`UpstreamQueue.why`: a quota, a
pause, every connection busy, ...); a message deferred by the upstream waits for its next
attempt; one held waits for the operator; one the scheduler has not loaded (memory holds
`spool.active_messages`) waits in the spool for room.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from relay.core.waits import (
    CREDENTIALS,
    DELIVERING,
    HELD,
    PAUSE_KINDS,
    READY,
    RETRY,
    SPOOLED,
    UNAVAILABLE,
    clock_time,
)
from relay.scheduler.entry import ACTIVE, WAITING, Entry
from relay.scheduler.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class Why:
    kind: str
    reason: str
    until: float | None = None  # wall clock, when known

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "reason": self.reason, "until": self.until}


def _unavailable(s: Scheduler, upstream_id: str) -> str | None:
    up = s.config.upstreams.get(upstream_id)
    return up.unavailable if up is not None else None


def why_entry(s: Scheduler, e: Entry, now: float, last_reply: str | None = None) -> Why:
    """Why an in-memory entry waits. `last_reply`: the upstream's last answer, when known."""
    if e.held:
        return Why(HELD, "held by operator")
    if e.state == ACTIVE:
        return Why(DELIVERING, f"being delivered to {e.upstream}")
    missing = _unavailable(s, e.upstream) if e.upstream else None
    if missing:
        return Why(UNAVAILABLE, f"upstream unavailable: {missing}")
    paused = s.health.get(e.upstream) if e.upstream else None
    if paused is not None:  # for a person: credentials, configuration, a daily limit
        p = paused.pause
        what = {"auth": "credentials failing", "policy": "configuration refused",
                "rate": "sending limit reached"}.get(p.kind, p.kind)
        return Why(PAUSE_KINDS.get(p.kind, CREDENTIALS),
                   f"upstream paused: {what}: {p.reason}; next step: {p.next_step}",
                   paused.until)
    if e.state == WAITING:
        after = f" after: {last_reply}" if last_reply else ""
        if e.next_attempt > now:
            return Why(RETRY, f"next attempt at {clock_time(e.next_attempt)}{after}",
                       e.next_attempt)
        return Why(READY, "due now: in line for delivery")
    uq = s.queues.get(e.upstream)
    if uq is not None and uq.why is not None and (
        uq.paused_until > now or uq.slots_until > now
    ):
        until = max(uq.paused_until, now + uq.why.seconds) if uq.paused_until > now else None
        return Why(uq.why.kind, uq.why.reason, until)
    return Why(READY, f"in line for delivery to {e.upstream}")


def why_spooled(held: bool, next_attempt: float, now: float,
                last_reply: str | None = None) -> Why:
    """Why a message the scheduler has not loaded waits."""
    if held:
        return Why(HELD, "held by operator")
    if next_attempt > now:
        after = f" after: {last_reply}" if last_reply else ""
        return Why(RETRY, f"next attempt at {clock_time(next_attempt)}{after}", next_attempt)
    return Why(SPOOLED, "in the spool: loaded when the scheduler has room"
                        " (spool.active_messages)")


def waiting_summary(s: Scheduler, now: float) -> list[dict[str, object]]:
    """In-memory messages by (reason kind, upstream), with one sentence each: what the
    queue summary shows and the metric counts."""
    groups: Counter[tuple[str, str]] = Counter()
    text: dict[tuple[str, str], Why] = {}
    for e in s.entries.values():
        w = why_entry(s, e, now)
        k = (w.kind, e.upstream)
        groups[k] += 1
        if w.kind == RETRY:  # many times: show the earliest
            prev = text.get(k)
            if prev is None or (w.until or 0) < (prev.until or 0):
                text[k] = Why(RETRY, f"deferred: next attempts from {clock_time(w.until or now)}",
                              w.until)
        else:
            text.setdefault(k, w)
    return [
        {"kind": kind, "upstream": up or None, "messages": n, "reason": text[(kind, up)].reason,
         "until": text[(kind, up)].until}
        for (kind, up), n in sorted(groups.items())
    ]
