"""Message trace: the whole trail of a message from the event log, found by queue id,
Message-ID or recipient — received (client, listener, attribution and routing rule), every
attempt (upstream, egress address, TLS, reply, class), operator actions, the final
disposition per recipient, the DSN it caused, and which webhook endpoints have each event.

Events are kept for `events.retention` (default 7 days) and then pruned, so a trace reaches
that far back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from relay.notify import model as ev
from relay.notify.webhook import EndpointState
from relay.spool import Spool, StoredEvent, is_queue_id

MAX_EVENTS = 5000
_FINAL = {ev.DELIVERED, ev.BOUNCED, ev.EXPIRED, ev.SUPPRESSED, ev.DSN_FAILED}
_ATTEMPTS = {ev.DELIVERED, ev.DEFERRED, ev.BOUNCED, ev.EXPIRED, ev.DSN_FAILED}


def _sent(e: StoredEvent, data: dict[str, Any], endpoints: Sequence[EndpointState]
          ) -> tuple[list[str], list[str]]:
    sent: list[str] = []
    waiting: list[str] = []
    for st in endpoints:
        ep = st.endpoint
        if ep.types is not None and e.row.type not in ep.types:
            continue
        if ep.org is not None and e.row.org != ep.org:
            continue
        (sent if e.seq <= st.acked else waiting).append(ep.name)
    return sent, waiting


async def trace(spool: Spool, query: str, *, endpoints: Sequence[EndpointState] = (),
                stream: str = "") -> dict[str, Any]:
    """{"query", "messages": [one trail per queue id]}; empty when nothing matches."""
    log = spool.events
    if is_queue_id(query):
        found = await log.find(queue_ids=[query], limit=MAX_EVENTS)
    else:
        hits = await log.find(message_id=query.strip("<>"), recipient=query.lower(),
                              limit=MAX_EVENTS)
        qids = sorted({e.row.queue_id for e in hits if e.row.queue_id})
        found = await log.find(queue_ids=qids, limit=MAX_EVENTS) if qids else []
        # Refusals at RCPT have no queue id: keep them as they are.
        found += [e for e in hits if not e.row.queue_id]
    # Follow DSNs: the DSN's own delivery (or failure) belongs to the original's trail.
    dsn_of: dict[str, str] = {}
    for e in found:
        if e.row.type == ev.DSN_QUEUED:
            dsn_qid = json.loads(e.row.data).get("dsn_queue_id")
            if dsn_qid:
                dsn_of[dsn_qid] = e.row.queue_id
    if dsn_of:
        found += await log.find(queue_ids=sorted(dsn_of), limit=MAX_EVENTS)
    by_qid: dict[str, dict[str, Any]] = {}
    for e in sorted({x.seq: x for x in found}.values(), key=lambda x: x.seq):
        data = json.loads(e.row.data)
        data["seq"] = e.seq
        data["stream"] = stream
        sent, waiting = _sent(e, data, endpoints)
        data["webhooks"] = {"sent": sent, "waiting": waiting}
        owner = dsn_of.get(e.row.queue_id, e.row.queue_id) or f"refused:{e.row.id}"
        t = by_qid.setdefault(owner, {
            "queue_id": owner, "message_id": "", "org": e.row.org, "received": None,
            "attempts": [], "actions": [], "recipients": {}, "dsn": None, "events": [],
        })
        t["events"].append(data)
        if data.get("message_id") and e.row.queue_id == owner:
            t["message_id"] = t["message_id"] or data["message_id"]
        kind = e.row.type
        if kind == ev.RECEIVED:
            t["received"] = {k: data.get(k) for k in (
                "ts", "client", "client_ip", "listener", "helo", "tls", "sender", "account",
                "recipients", "size", "attributed_by", "upstream", "routed_by")}
        elif kind == ev.DSN_QUEUED:
            t["dsn"] = {"queue_id": data.get("dsn_queue_id"), "queued_at": data.get("ts"),
                        "upstream": data.get("upstream"), "status": "queued"}
        elif kind in _ATTEMPTS and e.row.queue_id != owner:  # the DSN's own attempt
            if t["dsn"] is not None:
                t["dsn"]["status"] = "delivered" if kind == ev.DELIVERED else kind
                t["dsn"]["reply"] = data.get("reply")
        elif kind in _ATTEMPTS:
            t["attempts"].append({k: data.get(k) for k in (
                "ts", "recipient", "attempt", "type", "upstream", "egress", "tls", "reply",
                "class", "next_attempt", "operator")})
        elif kind != ev.SUPPRESSED:
            t["actions"].append({k: data.get(k) for k in ("ts", "type", "operator")})
        if kind in _FINAL and e.row.queue_id == owner and e.row.recipient:
            t["recipients"][e.row.recipient] = {"status": kind, "ts": data.get("ts"),
                                                "reply": data.get("reply"),
                                                "class": data.get("class")}
        elif kind == ev.DEFERRED and e.row.recipient:
            t["recipients"].setdefault(e.row.recipient, {"status": "pending"})
    for t in by_qid.values():
        m = await spool.get(t["queue_id"]) if is_queue_id(t["queue_id"]) else None
        if m is not None:
            for r in m.pending:
                t["recipients"][r.rcpt] = {"status": "pending", "attempts": r.attempts,
                                           "next_attempt": r.next_attempt or None,
                                           "last_reply": r.last_reply or None}
        t["queued"] = m is not None
    messages = sorted(by_qid.values(), key=lambda t: t["events"][0]["ts"])
    return {"query": query, "messages": messages}
