"""A queued message as the scheduler holds it in memory (no body: that stays in the spool)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from relay.spool import RcptStatus, SpoolMessage

# Where an entry is: in the timer heap, in its upstream's ready queue, or being delivered.
WAITING, READY, ACTIVE = 0, 1, 2

SpoolKey = tuple[float, str]  # (due, queue_id): the spool's due order


@dataclass(slots=True, kw_only=True)
class Entry:
    """One queued message. Built with keywords: `Entry(queue_id=…, sender=…, …)`."""

    queue_id: str
    sender: str
    org: str
    account: str
    received_at: float
    pending: dict[str, int]  # recipient -> failed attempts so far
    is_dsn: bool = False
    held: bool = False
    next_attempt: float = 0.0
    upstream: str = ""
    state: int = WAITING
    dsn: str | None = None  # RFC 3461 parameters as the spool keeps them (relay.core.dsn)
    via: str = ""  # set when the policy's failover chose the upstream: why (the mail log says)

    def __post_init__(self) -> None:
        # One Entry per queued message stays in memory (200,000 queued ≈ 200,000 entries):
        # share the few distinct organisation/upstream names, and the account when it is
        # the sender (the usual case), instead of a string object per message.
        self.org = sys.intern(self.org)
        self.upstream = sys.intern(self.upstream)
        if self.account == self.sender:
            self.account = self.sender

    @property
    def key(self) -> SpoolKey:
        """Its place in the spool's due order (a lower bound of the spool's own key)."""
        return (self.next_attempt, self.queue_id)

    @classmethod
    def from_spool(cls, m: SpoolMessage, due: float | None = None) -> Entry:
        pend = [r for r in m.recipients if r.status is RcptStatus.PENDING]
        return cls(
            queue_id=m.queue_id,
            sender=m.sender,
            org=m.org,
            account=m.account,
            received_at=m.received_at,
            pending={r.rcpt: r.attempts for r in pend},
            is_dsn=m.is_dsn,
            held=m.held,
            next_attempt=min((r.next_attempt for r in pend), default=0.0) if due is None else due,
            upstream=m.upstream,
            dsn=m.dsn,
        )


def key_after(key: SpoolKey) -> SpoolKey:
    """The smallest key above `key` (queue ids have a fixed length, so id + NUL is next)."""
    return (key[0], key[1] + "\0")
