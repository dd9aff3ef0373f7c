"""The intake: what the listener calls — who may send, then policy, limits and the spool.

It is the only place where an accepted SMTP transaction becomes a queued message: attribute
(trusted tags, sender), route (by the current config), check intake limits, strip the tag
headers, make it durable, hand it to the scheduler. The listener
answers 250 only after `submit` returns.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Protocol

from relay.config.model import Config
from relay.core.errors import (
    AccessDenied,
    PermanentError,
    PolicyError,
    RelayError,
    TemporaryError,
)
from relay.core.message import take_headers
from relay.core.model import Disposition, Envelope
from relay.events import MailLog
from relay.intake.suppressed import SuppressionCheck
from relay.notify import model as ev
from relay.notify.suppression import SuppressionList
from relay.policy import AppliedLimit, Attribution, applicable_limits, attribute, route
from relay.scheduler import Entry, Scheduler
from relay.smtp.penalty import PenaltyBox
from relay.smtp.server import SessionInfo
from relay.spool import Spool, new_queue_id

log = logging.getLogger("relay.intake")
# Client addresses whose allowlist answer an Intake remembers (see Intake.allowlisted).
ALLOWED_CACHE = 4096


class Users(Protocol):
    def verify(self, user: str, password: str) -> bool: ...


class IntakeLimiter(Protocol):
    """Intake rate limits (relay.limits). Raises RateLimited (451 4.7.1) when over."""

    async def check_message(self, limits: list[AppliedLimit], recipients: int) -> None: ...
    def connection_opened(self, client: str) -> None: ...
    def connection_closed(self, client: str) -> None: ...


class Intake:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        scheduler: Scheduler,
        events: MailLog,
        *,
        users: Users | None = None,
        limiter: IntakeLimiter | None = None,
        policy_timeout: float = 10.0,
        penalty: PenaltyBox | None = None,
        suppression: SuppressionList | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.scheduler = scheduler
        self.events = events
        self.users = users
        self.limiter = limiter
        self.policy_timeout = policy_timeout
        # Failed-AUTH accounting across connections; the app passes one box that outlives
        # config reloads.
        self.penalty = penalty if penalty is not None else PenaltyBox()
        self._networks = [ipaddress.ip_network(n) for n in config.relay.clients.networks]
        # allowlisted() by client address: asked at connect and again at MAIL, for every
        # message, and a parsed address costs ~3 µs. Emptied when full (a scan of many
        # addresses); a reload builds a new Intake, so it never outlives its networks.
        self._allowed: dict[str, bool] = {}
        self.suppressed = SuppressionCheck(config, spool, events, suppression)

    def allowlisted(self, ip: str) -> bool:
        known = self._allowed.get(ip)
        if known is None:
            if len(self._allowed) >= ALLOWED_CACHE:
                self._allowed.clear()
            known = self._allowed[ip] = self._allowlisted(ip)
        return known

    def _allowlisted(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped:  # ::ffff:a.b.c.d on dual-stack sockets
            addr = addr.ipv4_mapped
        return any(addr in n for n in self._networks)

    # -- listener hooks ----------------------------------------------------------------
    def check_connect(self, peer_ip: str) -> None:
        # Unknown networks may still AUTH (the relay-access check is at MAIL), unless they
        # are in the AUTH penalty box. Allowlisted networks need no AUTH: never blocked here.
        if not self.allowlisted(peer_ip) and self.penalty.blocked_for(peer_ip) > 0:
            raise _auth_blocked()
        if self.limiter is not None:
            try:
                self.limiter.connection_opened(peer_ip)  # concurrent connections per client
            except RelayError as exc:
                self.events.emit(Disposition.REJECTED, client=peer_ip, reason=type(exc).__name__,
                                 detail=exc.reason, reply=exc.reply())
                raise

    def connection_closed(self, peer_ip: str) -> None:
        """The listener: a connection that passed check_connect has ended."""
        if self.limiter is not None:
            self.limiter.connection_closed(peer_ip)

    def authenticate(self, session: SessionInfo, user: str, password: str) -> bool:
        if self.penalty.blocked_for(session.peer_ip) > 0:
            # Refused before the password is checked: a blocked guesser learns nothing.
            self.events.emit(Disposition.REJECTED, client=session.peer_ip, reason="auth_blocked",
                             user=user)
            raise _auth_blocked()
        ok = self.users is not None and self.users.verify(user, password)
        if ok:
            self.penalty.success(session.peer_ip)
        else:
            self.events.emit(Disposition.REJECTED, client=session.peer_ip, reason="auth", user=user)
            cooloff = self.penalty.failure(session.peer_ip)
            if cooloff:
                log.warning("%s: too many failed AUTH attempts, blocked for %.0fs",
                            session.peer_ip, cooloff)
        return ok

    def check_sender(self, session: SessionInfo, sender: str) -> None:
        # Postfix order: relay access before anything else. Never an open relay.
        if session.user is None and not self.allowlisted(session.peer_ip):
            self.events.emit(Disposition.REJECTED, client=session.peer_ip, sender=sender,
                             reason="relay_access")
            raise AccessDenied(f"Relay access denied for {session.peer_ip}")

    def check_recipient(self, session: SessionInfo, sender: str, rcpt: str) -> None:
        # Suppression lists (per organisation, opt-in): the organisation the sender belongs
        # to; tag headers come with DATA and are checked again in submit.
        self.suppressed.at_rcpt(session, sender, rcpt)

    async def submit(self, session: SessionInfo, envelope: Envelope) -> str:
        client = session.user or session.peer_ip
        try:
            async with asyncio.timeout(self.policy_timeout):  # no task per message (wait_for)
                prepared = await self._prepare(session, envelope)
        except RelayError as exc:
            self.events.emit(Disposition.REJECTED, client=client, sender=envelope.sender,
                             reason=type(exc).__name__, reply=exc.reply(),
                             detail=exc.reason if exc.reason != exc.client_text else None)
            raise
        except Exception as exc:  # fail closed: a policy bug or timeout is 451 4.3.5, never 250
            log.exception("policy failed for a message from %s", client)
            raise PolicyError(reason=f"policy failed: {exc!r}") from exc
        att, upstream_id, rule, data = prepared
        qid = new_queue_id()
        message_id = ev.message_id_of(data)
        recipients, dropped = self.suppressed.at_data(att.org, qid, envelope, message_id, client)
        if not recipients:  # every recipient is suppressed for the tagged organisation
            await self.spool.events.add([row for _, _, row in dropped])
            raise PermanentError(dropped[0][1], code=550, enhanced="5.1.1")
        rows = [ev.make_event(
            ev.RECEIVED, queue_id=qid, org=att.org, account=att.account, sender=envelope.sender,
            message_id=message_id, client=client, client_ip=session.peer_ip,
            listener=session.listener or None, helo=session.helo or None,
            tls=session.tls or None, recipients=list(recipients), size=len(data),
            upstream=upstream_id, attributed_by=att.rule, routed_by=rule,
        ), *(row for _, _, row in dropped)]
        dsn = envelope.dsn.encode() if envelope.dsn else None
        started = time.monotonic()
        try:
            qid = await self.spool.put(sender=envelope.sender, recipients=recipients,
                                       data=data, client=client, org=att.org, account=att.account,
                                       upstream=upstream_id, queue_id=qid, events=rows,
                                       dsn=dsn, wire=envelope.wire)
        except RelayError as exc:  # disk full, read-only, …: 451 4.3.0, and a mail-log line
            self.events.emit(Disposition.REJECTED, client=client, sender=envelope.sender,
                             reason=type(exc).__name__, reply=exc.reply(), detail=exc.reason)
            raise
        now = time.time()
        self.events.metrics.spool_commit.observe(time.monotonic() - started)
        self.events.emit(Disposition.RECEIVED, queue_id=qid, client=client, org=att.org,
                         account=att.account, sender=envelope.sender,
                         recipients=len(recipients), size=len(data), upstream=upstream_id,
                         attributed_by=att.rule)
        self.scheduler.enqueue(Entry(
            queue_id=qid, sender=envelope.sender, org=att.org, account=att.account,
            received_at=now, pending=dict.fromkeys(recipients, 0), upstream=upstream_id,
            dsn=dsn,
        ))
        return qid

    async def _prepare(
        self, session: SessionInfo, env: Envelope
    ) -> tuple[Attribution, str, str, bytes]:
        cfg = self.config
        names = (cfg.relay.attribution.org_header, cfg.relay.attribution.account_header)
        (tag_org, tag_account), data = take_headers(env.data, names)
        att = attribute(cfg, env.sender, tag_org=tag_org, tag_account=tag_account)
        r = route(cfg, att)
        if self.limiter is not None:
            limits = applicable_limits(cfg, att, env.sender, session.user or session.peer_ip)
            await self.limiter.check_message(limits, len(env.recipients))
        # The listener already put its Received: header first; the tags are client headers.
        return att, r.upstream.id, r.rule, data


def _auth_blocked() -> TemporaryError:
    # 421 closes the connection (RFC 5321 § 3.8); 4.7.0 is "other security" (RFC 3463).
    return TemporaryError("Too many authentication failures from your address, try again later",
                          code=421, enhanced="4.7.0")
