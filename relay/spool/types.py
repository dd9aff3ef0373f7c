"""The spool's value types: a queued message's metadata and its per-recipient state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class RcptStatus(StrEnum):
    PENDING = "pending"  # still to be delivered (first attempt or retry)
    DELIVERED = "delivered"  # upstream answered 2xx
    BOUNCED = "bounced"  # upstream answered 5xx, or an operator bounced it
    EXPIRED = "expired"  # still 4xx when the maximum queue age was reached


@dataclass(slots=True)
class SpoolRecipient:
    rcpt: str
    status: RcptStatus
    attempts: int = 0
    next_attempt: float = 0.0  # unix time; 0 = now
    last_reply: str = ""  # upstream's own reply text, e.g. "451 4.7.1 try later"


@dataclass(slots=True)
class SpoolMessage:
    """Metadata of one queued message; the body is read separately (Spool.read_body)."""

    queue_id: str
    received_at: float
    sender: str  # "" = null sender
    client: str  # client ip or auth user
    org: str
    account: str
    upstream: str  # upstream id chosen at enqueue (re-routed at each attempt; updatable)
    size: int
    held: bool
    is_dsn: bool
    recipients: list[SpoolRecipient]
    dsn: str | None = None  # RFC 3461 parameters (relay.core.dsn.DsnParams.encode), if any

    @property
    def pending(self) -> list[SpoolRecipient]:
        """The recipients still to be delivered."""
        return [r for r in self.recipients if r.status is RcptStatus.PENDING]


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """The new state of one recipient after a delivery attempt (or an operator action)."""

    rcpt: str
    status: RcptStatus
    attempts: int
    next_attempt: float
    last_reply: str


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event as the spool keeps it (relay/notify builds them): written in the same
    transaction as the state change it reports. `data` is the whole event as JSON text;
    the other columns are what lists, traces and outboxes search by."""

    id: str
    ts: float
    type: str
    queue_id: str
    message_id: str
    org: str
    recipient: str
    data: str
