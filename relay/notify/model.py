"""The event model: what one event says, built as the spool row that stores it.

Every event has a stable `id` (for the receiver's idempotency), `type`, `ts`, the message's
queue id, Message-ID, organisation, account, sender and recipient, and where it applies the
upstream, egress address, TLS version, attempt, the upstream's own reply (code, enhanced
code, text: secrets redacted) and a failure `class` (relay.delivery.replyclass). The
webhook sender adds `stream` and `seq` (the shard's order, for gap checks) when it posts.
"""

from __future__ import annotations

import time
from typing import Any

from relay.core import jsonline
from relay.core.model import Reply
from relay.core.redact import redact
from relay.spool import EventRow, new_queue_id

# The event types (relay.config.notify.EVENT_TYPES is the same list, for the schema).
RECEIVED = "received"
DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"
EXPIRED = "expired"
SUPPRESSED = "suppressed"
HELD = "held"
RELEASED = "released"
RETRIED = "retried"
DELETED = "deleted"
DSN_QUEUED = "dsn_queued"
DSN_FAILED = "dsn_failed"


def new_event_id() -> str:
    """Unique across nodes and time-sortable (the queue-id generator, prefixed)."""
    return "E" + new_queue_id()


def reply_fields(reply: Reply) -> dict[str, Any]:
    return {"code": reply.code, "enhanced": reply.enhanced, "text": redact(reply.text)}


def make_event(kind: str, *, queue_id: str, org: str = "", account: str = "",
               sender: str | None = None, recipient: str = "", message_id: str = "",
               reply: Reply | None = None, ts: float | None = None,
               klass: str | None = None, **fields: Any) -> EventRow:
    """One event as its spool row. `fields` adds the rest (upstream, egress, tls, attempt,
    class, next_attempt, ...); None values are left out."""
    when = time.time() if ts is None else ts
    eid = new_event_id()
    data: dict[str, Any] = {
        "id": eid, "type": kind, "ts": round(when, 6), "queue_id": queue_id,
        "message_id": message_id, "org": org, "account": account, "sender": sender,
        "recipient": recipient or None,
    }
    if reply is not None:
        data["reply"] = reply_fields(reply)
    if klass:
        data["class"] = klass
    for key, value in fields.items():
        if value is not None:
            data[key] = redact(value) if isinstance(value, str) and key in ("reason",) else value
    data = {k: v for k, v in data.items() if v is not None}
    return EventRow(
        id=eid, ts=when, type=kind, queue_id=queue_id, message_id=message_id, org=org,
        recipient=recipient,
        data=jsonline.dumps(data),
    )


def message_id_of(headers: bytes | None) -> str:
    """The Message-ID header's value without angle brackets ("" when there is none)."""
    if not headers:
        return ""
    from_idx = headers.find(b"\r\n\r\n")
    block = headers if from_idx < 0 else headers[: from_idx + 2]
    lower = block.lower()
    pos = lower.find(b"\nmessage-id:")
    if pos < 0:
        if not lower.startswith(b"message-id:"):
            return ""
        pos = -1
    start = pos + 1 + len(b"message-id:")
    end = block.find(b"\r\n", start)
    while end >= 0 and block[end + 2: end + 3] in (b" ", b"\t"):  # folded
        end = block.find(b"\r\n", end + 2)
    raw = block[start: end if end >= 0 else len(block)]
    value = raw.replace(b"\r\n", b"").decode("utf-8", "replace").strip()
    return value.strip("<>")[:998]
