"""The bounce stage: for recipients that bounced or expired, one RFC 3464 DSN to the sender,
made durable in the spool like any message (with its `dsn_queued` event) and handed back to
the scheduler to deliver through the DSN upstream (relay/policy/dsnroute.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from relay.bounce.dsn import build_dsn, should_send_dsn
from relay.core.dsn import DsnParams, xtext_decode
from relay.core.message import header_end
from relay.core.model import Disposition, Reply
from relay.events import MailLog
from relay.notify import model as ev
from relay.scheduler.entry import Entry
from relay.spool import Spool, new_queue_id

log = logging.getLogger("relay.bounce")


class Bouncer:
    """relay.scheduler.ports.BounceNotifier over the spool and the mail log."""

    def __init__(
        self,
        spool: Spool,
        events: MailLog,
        *,
        clock: Callable[[], float],
        dsn_upstream: Callable[[str], str | None] | None = None,
    ) -> None:
        self.spool = spool
        self.events = events
        self.clock = clock
        # organisation -> the upstream its DSNs go through, None: it turned DSNs off
        self.dsn_upstream = dsn_upstream or (lambda org: "")

    async def bounced(
        self,
        e: Entry,
        failed: list[tuple[str, str, Reply]],
        data: bytes | None,
        *,
        reporting_mta: str,
    ) -> Entry | None:
        """Queue one DSN to `e.sender` for the `failed` recipients (recipient, status, reply);
        returns its entry, or None when no DSN is due (null sender, a DSN itself) or it could
        not be queued (logged: the failure is in the mail log already)."""
        if not should_send_dsn(e.sender, e.is_dsn):
            return None
        upstream = self.dsn_upstream(e.org)
        if upstream is None:
            log.info("no DSN for %s: organisation %s takes webhooks instead", e.queue_id, e.org)
            return None
        # RFC 3461 § 4.1: NOTIFY=NEVER, or a NOTIFY without FAILURE, asks for no DSN.
        params = DsnParams.decode(e.dsn)
        failed = [f for f in failed if params.notify(f[0], "FAILURE")]
        if not failed:
            return None
        if data is None:
            try:
                data = await self.spool.read_body(e.queue_id)
            except KeyError:
                data = b""
        headers = data[: header_end(data)]
        dsn = build_dsn(
            reporting_mta=reporting_mta,
            original_sender=e.sender,
            queue_id=e.queue_id,
            arrival=e.received_at,
            failures=failed,
            original_headers=headers,
            now=self.clock(),
            envid=xtext_decode(params.envid) if params.envid else None,
            original_recipients={
                r: xtext_decode(p.orcpt) for r, p in params.rcpts if p.orcpt is not None
            },
        )
        qid = new_queue_id()
        event = ev.make_event(
            ev.DSN_QUEUED, queue_id=e.queue_id, org=e.org, account=e.account, sender=e.sender,
            recipient=e.sender, dsn_queue_id=qid, upstream=upstream or e.upstream,
            failed=[r for r, _, _ in failed], message_id=ev.message_id_of(headers),
        )
        try:
            await self.spool.put(
                sender="",
                recipients=[e.sender],
                data=dsn,
                client="relay",
                org=e.org,
                account=e.account,
                upstream=upstream or e.upstream,
                is_dsn=True,
                queue_id=qid,
                events=[event],
            )
        except Exception:
            log.exception("could not queue the DSN for %s", e.queue_id)
            return None
        self.events.emit(
            Disposition.QUEUED,
            queue_id=qid,
            org=e.org,
            account=e.account,
            sender="",
            recipients=1,
            dsn_for=e.queue_id,
        )
        return Entry(
            queue_id=qid,
            sender="",
            org=e.org,
            account=e.account,
            received_at=self.clock(),
            pending={e.sender: 0},
            is_dsn=True,
            upstream=upstream or e.upstream,
        )
