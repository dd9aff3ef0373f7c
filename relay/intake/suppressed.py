"""Suppressed recipients at intake: refused at RCPT (550 5.1.1 naming when and why) when the
sender's organisation has them on its suppression list, or left out at the end of DATA when
the organisation only became known from the trusted tag headers.

Each refusal is a `suppressed` event and a `rejected` mail-log line (reason `suppressed`).
A refusal at RCPT changes nothing stored, so its event is written on its own right after
(the client already has its answer); one at the end of DATA is written with the message.
"""

from __future__ import annotations

import asyncio
import logging

from relay.config.model import Config
from relay.core.errors import PermanentError
from relay.core.model import Disposition, Envelope
from relay.events import MailLog
from relay.notify import model as ev
from relay.notify.suppression import Suppression, SuppressionList
from relay.policy import attribute
from relay.smtp.server import SessionInfo
from relay.spool import EventRow, Spool

log = logging.getLogger("relay.intake")

MAX_PENDING_WRITES = 1000


class SuppressionCheck:
    def __init__(self, config: Config, spool: Spool, events: MailLog,
                 suppression: SuppressionList | None) -> None:
        self.config = config
        self.spool = spool
        self.events = events
        self.list = suppression
        self._writes: set[asyncio.Task[None]] = set()

    def _event(self, s: Suppression, *, queue_id: str, sender: str, message_id: str,
               client: str, stage: str) -> EventRow:
        return ev.make_event(
            ev.SUPPRESSED, queue_id=queue_id, org=s.org, sender=sender, recipient=s.recipient,
            message_id=message_id, client=client, stage=stage,
            suppressed_at=s.created_at, suppressed_until=s.expires_at, reason=s.reason,
            source=s.source, klass=s.klass,
        )

    def at_rcpt(self, session: SessionInfo, sender: str, rcpt: str) -> None:
        lst = self.list
        if lst is None or not lst.entries_exist:
            return
        org = attribute(self.config, sender).org
        s = lst.lookup(org, rcpt)
        if s is None:
            return
        client = session.user or session.peer_ip
        self.events.emit(Disposition.REJECTED, client=client, sender=sender, recipient=rcpt,
                         org=org, reason="suppressed", detail=s.reason)
        row = self._event(s, queue_id="", sender=sender, message_id="", client=client,
                          stage="rcpt")
        if len(self._writes) < MAX_PENDING_WRITES:
            task = asyncio.get_running_loop().create_task(self._write(row))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)
        else:
            log.warning("suppressed-event writes are backed up; not recording %s", row.id)
        raise PermanentError(s.refusal(), code=550, enhanced="5.1.1")

    async def _write(self, row: EventRow) -> None:
        try:
            await self.spool.events.add([row])
        except Exception as exc:
            log.warning("could not record the suppressed event %s: %s", row.id, exc)

    def at_data(self, org: str, queue_id: str, env: Envelope, message_id: str, client: str,
                ) -> tuple[list[str], list[tuple[str, str, EventRow]]]:
        """(recipients to queue, [(recipient, refusal text, its event)] left out)."""
        lst = self.list
        if lst is None or not lst.entries_exist:
            return list(env.recipients), []
        keep: list[str] = []
        dropped: list[tuple[str, str, EventRow]] = []
        for rcpt in env.recipients:
            s = lst.lookup(org, rcpt)
            if s is None:
                keep.append(rcpt)
                continue
            self.events.emit(Disposition.REJECTED, client=client, sender=env.sender,
                             recipient=rcpt, org=org, reason="suppressed", detail=s.reason)
            dropped.append((rcpt, s.refusal(), self._event(
                s, queue_id=queue_id, sender=env.sender, message_id=message_id, client=client, stage="data")))
        return keep, dropped
