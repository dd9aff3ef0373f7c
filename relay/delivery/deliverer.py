"""One message to one upstream from one egress source, with a result for every recipient.

`Deliverer.deliver` takes a pooled session (or opens one), runs one SMTP mail transaction
(MAIL, RCPT per recipient, DATA) and turns every reply, timeout or broken connection into
a `RecipientResult`. It never raises for network or SMTP trouble: the scheduler decides
what to do with deferred recipients, and concurrency limits are the scheduler's too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from relay.core.dsn import DsnParams
from relay.core.model import EgressSource, Outcome, RecipientResult, Reply, Upstream
from relay.delivery import outcome, providers
from relay.delivery.channel import BadReply, Channel
from relay.delivery.connection import (
    Session,
    SessionError,
    TlsContexts,
    error_reply,
    open_session,
)
from relay.delivery.pool import Pool
from relay.delivery.resolver import Resolver
from relay.oauth import TokenBroker

# RFC 5321 § 4.5.3.2.6: wait at least 10 minutes for the reply to the final "." of DATA
# (the server may be scanning or relaying the message before it answers).
DATA_TIMEOUT = 600.0

_SUCCESS = (250, 251)  # RCPT: 251 "user not local; will forward" is an acceptance too


class _StaleConnection(Exception):
    """A pooled connection turned out dead before the transaction began: nothing was sent."""


_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _has_control(address: str) -> bool:
    return _ASCII_CONTROL.search(address) is not None


def _path(address: str, encoding: str) -> bytes:
    # The listener validated the syntax; we only add the angle brackets (RFC 5321 § 4.1.2).
    return b"<" + address.encode(encoding) + b">"


class Deliverer:
    """The outbound SMTP client with its connection pool.

    Choices (documented because they are policy):
    - The null reverse-path `<>` (a DSN) stays null even when the upstream has a
      `from_address`: rewriting it would make bounces of bounces possible (RFC 5321
      § 4.5.5 says a DSN must be sent with the null sender). Every other sender is
      rewritten to `from_address` when set.
    - Session-level failures (no connection, TLS, AUTH — including 535 bad credentials,
      and an upstream host name that does not resolve) defer every recipient: they are
      fixed by an administrator, and the sender must not get a bounce for them. The queue's
      maximum age still bounds how long mail waits.
    - A body with 8-bit octets is sent even if the server does not offer 8BITMIME (without
      BODY=8BITMIME), as most MTAs do: converting to 7-bit would alter signed content, and
      a refusal still comes back as a normal reply.
    """

    def __init__(
        self,
        resolver: Resolver,
        *,
        idle_timeout: float = 30.0,
        max_idle_per_key: int = 20,  # the scheduler's default concurrency per upstream
        logger: logging.Logger | None = None,
        data_timeout: float = DATA_TIMEOUT,  # a cap; each upstream's data_timeout applies too
        quit_timeout: float = 5.0,
        unpooled: Callable[[Upstream], bool] | None = None,
        tokens: TokenBroker | None = None,
        before_mail: Callable[[Upstream], Awaitable[None]] | None = None,
    ) -> None:
        self.tokens = tokens  # access tokens for auth: xoauth2 upstreams (relay.oauth)
        # `before_mail(upstream)`: awaited just before a transaction's MAIL is sent (the
        # limits' `floor`: min_interval as the receiver sees it).
        self._before_mail = before_mail
        # `unpooled(upstream)`: its connections must not outlive a delivery (closed, QUIT
        # awaited, before deliver returns). The shared concurrency leases of relay.limits
        # are held around each delivery; an idle pooled connection would be open without
        # one, and two nodes could then exceed the upstream's max_connections together.
        self._unpooled = unpooled
        self._resolver = resolver
        self._log = logger or logging.getLogger("relay.delivery")
        self._data_timeout = data_timeout
        self._pool = Pool(
            idle_timeout=idle_timeout, max_idle_per_key=max_idle_per_key, quit_timeout=quit_timeout
        )
        self._tls = TlsContexts(self._log)

    @property
    def pool(self) -> Pool:
        return self._pool

    async def close(self) -> None:
        await self._pool.close()

    async def trim(self, upstream: Upstream, keep_idle: int) -> None:
        """Close the idle connections to `upstream` beyond `keep_idle` and wait until they
        are closed (their slots go to another worker next: both must not be open at once)."""
        extra = self._pool.take_idle(upstream.pool_key, keep=keep_idle)
        if extra:
            await asyncio.gather(*(self._pool.close_now(s) for s in extra))

    async def deliver(
        self,
        upstream: Upstream,
        source: EgressSource,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        dsn: DsnParams | None = None,
        wire: bool = False,
    ) -> list[RecipientResult]:
        """`dsn`: the message's RFC 3461 parameters, passed on when the upstream offers DSN
        (otherwise the relay itself answers for NOTIFY=FAILURE, relay/bounce). `wire`: `data`
        is wire-ready (CRLF lines, none starting with ".", ending in CRLF: the spool says so
        of what our listener received), sent as is."""
        recipients = list(recipients)
        if not recipients:
            return []
        if upstream.unavailable:
            # e.g. its credential is missing: the mail waits until a reload fixes it.
            reply = outcome.synthesised(
                451, "4.3.5", f"upstream {upstream.id} unavailable: {upstream.unavailable}"
            )
            return [RecipientResult(r, Outcome.DEFERRED, reply) for r in recipients]
        if sender and upstream.from_address:
            sender = upstream.from_address
        try:
            return await self._deliver(upstream, source, sender, recipients, data, dsn, wire)
        except Exception:
            # A bug here must not lose or bounce mail: fail closed, like errors.to_reply.
            self._log.exception("upstream %s: unexpected error during delivery", upstream.id)
            reply = outcome.synthesised(451, "4.3.0", "local error during delivery, will retry")
            return [RecipientResult(r, Outcome.DEFERRED, reply) for r in recipients]

    async def _deliver(
        self,
        upstream: Upstream,
        source: EgressSource,
        sender: str,
        recipients: list[str],
        data: bytes,
        dsn: DsnParams | None = None,
        wire: bool = False,
    ) -> list[RecipientResult]:
        key = (*upstream.pool_key, source.address)

        # At most two sessions: a pooled one that may have died while idle, then a fresh
        # one. A fresh session's failure is final for this attempt.
        one_shot = self._unpooled is not None and self._unpooled(upstream)
        session = None if one_shot else self._pool.checkout(key)
        for _ in range(2):
            if session is None:
                if upstream.throttle.max_connections and not one_shot:
                    # Connections to it are counted: an idle one from another egress source
                    # goes before a new one opens, so idle + in use never exceed the count.
                    await self.trim(upstream, self._pool.idle_for(upstream.pool_key) - 1)
                try:
                    session = await open_session(
                        upstream, source, self._resolver, self._tls, self._log, self.tokens
                    )
                except SessionError as exc:
                    pause = providers.classify(upstream, exc.reply).as_pause(exc.reply)
                    return [
                        RecipientResult(r, Outcome.DEFERRED, exc.reply, exc.throttled, pause=pause)
                        for r in recipients
                    ]
                fresh = True
            else:
                fresh = False
            try:
                results = await self._transaction(
                    session, upstream, sender, recipients, data, reused=not fresh, dsn=dsn,
                    wire=wire,
                )
                results = [self._judge(upstream, r) for r in results]
                version = session.channel.tls_version
                if version is not None:
                    results = [replace(r, tls=version) for r in results]
            except _StaleConnection:
                self._log.debug(
                    "upstream %s: pooled connection was dead, reconnecting", upstream.id
                )
                session.channel.close()
                session = None
                continue
            except BaseException:
                session.channel.close()  # cancelled mid-transaction: the session is in an unknown state
                raise
            if one_shot:
                await self._pool.close_now(session)
            else:
                # Keep as many idle sessions as deliveries may run at once: when 20 finish
                # together, 20 are reused instead of 16 being QUIT and reopened moments
                # later (benchmarks/RESULTS.md: 9,000 upstream sessions per 20,000 → 1).
                self._pool.checkin(
                    session,
                    max_messages=upstream.throttle.max_messages_per_connection,
                    max_idle=upstream.throttle.max_connections,
                )
            return results
        raise AssertionError("unreachable: a fresh session never raises _StaleConnection")

    async def _transaction(
        self,
        session: Session,
        upstream: Upstream,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        reused: bool,
        dsn: DsnParams | None = None,
        wire: bool = False,
    ) -> list[RecipientResult]:
        channel = session.channel
        stage = "RSET"
        timeout = upstream.command_timeout
        results: dict[str, RecipientResult] = {}
        try:
            if reused and not session.clean:
                # Liveness check and a clean transaction state in one round trip. After a
                # completed transaction it is skipped: a dead connection then shows at MAIL
                # (disconnect or 421), which is retried once on a fresh connection too.
                try:
                    channel.send(b"RSET\r\n")
                    code, _ = await channel.reply(timeout)
                except (BadReply, OSError, TimeoutError) as exc:
                    raise _StaleConnection from exc
                if code != 250:
                    raise _StaleConnection

            # Envelope checks against what this server supports.
            smtputf8 = outcome.needs_smtputf8(sender, recipients)
            if _has_control(sender):
                reply = outcome.synthesised(553, "5.1.7", "bad sender address syntax")
                return [RecipientResult(r, Outcome.BOUNCED, reply) for r in recipients]
            for rcpt in recipients:
                if _has_control(rcpt):
                    results[rcpt] = RecipientResult(
                        rcpt,
                        Outcome.BOUNCED,
                        outcome.synthesised(553, "5.1.3", "bad recipient address syntax"),
                    )
            if smtputf8 and not session.supports("smtputf8"):
                why = outcome.utf8_unsupported(
                    f"{upstream.host} does not support SMTPUTF8, needed for this non-ASCII "
                    "address (RFC 6531)"
                )
                if not outcome.is_ascii(sender):
                    return [RecipientResult(r, Outcome.BOUNCED, why) for r in recipients]
                for rcpt in recipients:
                    if not outcome.is_ascii(rcpt):
                        results[rcpt] = RecipientResult(rcpt, Outcome.BOUNCED, why)
                smtputf8 = False
            pending = [r for r in recipients if r not in results]
            if not pending:
                return [results[r] for r in recipients]

            encoding = "utf-8" if smtputf8 else "ascii"
            mail = b"MAIL FROM:" + _path(sender, encoding)
            if session.supports("size"):
                mail += b" SIZE=%d" % len(data)  # RFC 1870: refused early if too big
            if outcome.needs_8bitmime(data) and session.supports("8bitmime"):
                mail += b" BODY=8BITMIME"
            if smtputf8:
                mail += b" SMTPUTF8"
            if dsn and not session.supports("dsn"):
                dsn = None  # RFC 3461 § 4: only to a server that offers DSN
            if dsn:
                mail += dsn.mail_params()
            mail += b"\r\n"
            rcpt_commands = [
                b"RCPT TO:" + _path(r, encoding) + (dsn.rcpt_params(r) if dsn else b"") + b"\r\n"
                for r in pending
            ]
            # RFC 2920 § 3.1: MAIL and RCPT may go anywhere in a group, DATA only last; the
            # replies come back in order and each is checked. Without PIPELINING, lock-step.
            pipelined = session.supports("pipelining")

            if self._before_mail is not None:
                await self._before_mail(upstream)
            stage = "MAIL FROM"
            session.messages += 1
            session.clean = False
            try:
                if pipelined:
                    channel.send(b"".join([mail, *rcpt_commands, b"DATA\r\n"]))
                else:
                    channel.send(mail)
                code, text = await channel.reply(timeout)
            except ConnectionError as exc:
                if reused:
                    raise _StaleConnection from exc
                raise
            if code == 421 and reused:
                raise _StaleConnection  # the server closed our idle connection
            if code != 250:
                reply = outcome.parse_reply(code, text)
                if pipelined:
                    await self._skip_replies(channel, len(rcpt_commands) + 1, timeout)
                # A refused sender refuses the whole message: 5xx bounces, 4xx defers. Any
                # other code (e.g. a 252) accepted nothing: deferred, never "delivered".
                return self._finish(recipients, results, pending, reply, deferred=reply.code < 400)

            accepted: list[str] = []
            stage = "RCPT TO"
            for rcpt, command in zip(pending, rcpt_commands, strict=True):
                if not pipelined:
                    channel.send(command)
                code, text = await channel.reply(timeout)
                if code in _SUCCESS:
                    accepted.append(rcpt)
                    continue
                reply = outcome.parse_reply(code, text)
                # Not 250/251 and not a refusal (a 252, a 3xx, garbage): nothing was
                # accepted for this recipient, so it waits; it is never marked delivered.
                results[rcpt] = self._result(rcpt, reply, deferred=reply.code < 400)
                if code == 421:
                    # The server is closing the channel (RFC 5321 § 3.8): the remaining
                    # recipients were not tried (or not answered), so they wait with the
                    # same reply.
                    channel.close()
                    return self._finish(recipients, results, pending, reply)

            stage = "DATA"
            if not accepted:
                if pipelined:
                    await self._skip_replies(channel, 1, timeout)  # DATA's refusal
                # Lock-step: DATA was never sent. The session stays not clean: RSET first
                # if it is reused.
                return [results[r] for r in recipients]
            if not pipelined:
                channel.send(b"DATA\r\n")
            code, text = await channel.reply(timeout)
            if code != 354:
                # The transaction failed at DATA: every accepted recipient gets that reply.
                return self._finish(recipients, results, accepted, outcome.parse_reply(code, text))
            channel.send_body(data, wire=wire)
            code, text = await channel.reply(min(upstream.data_timeout, self._data_timeout))
            # DATA's final reply ends the transaction either way (RFC 5321 § 4.1.1.4).
            session.clean = True
            return self._finish(recipients, results, accepted, outcome.parse_reply(code, text))
        except _StaleConnection:
            raise
        except (BadReply, OSError, TimeoutError) as exc:
            channel.close()
            reply = error_reply(exc, upstream, session.peer, session.source, stage)
            self._log.info("upstream %s: %s", upstream.id, reply)
            pending = [r for r in recipients if r not in results]
            return self._finish(recipients, results, pending, reply, deferred=True)

    @staticmethod
    def _judge(upstream: Upstream, res: RecipientResult) -> RecipientResult:
        """A reply that means the upstream needs a person (credentials, configuration, a
        daily quota; relay.delivery.providers) defers instead of bouncing, and says so."""
        if res.outcome is Outcome.DELIVERED:
            return res
        pause = providers.classify(upstream, res.reply).as_pause(res.reply)
        if pause is None:
            return res
        return replace(res, outcome=Outcome.DEFERRED, pause=pause)

    async def _skip_replies(self, channel: Channel, count: int, within: float) -> None:
        """Read the replies to the rest of a pipelined group we are abandoning (MAIL was
        refused, or every RCPT was: RFC 2920 § 3.1 has the server refuse the DATA then,
        503 or 554). The body is never sent. A server that answers DATA with 354 anyway
        is waiting for a body: we close the connection instead, which aborts its
        transaction (RFC 5321 § 4.1.1.4); a lone "." would have delivered an empty message
        to whatever recipients it believes it accepted. Any trouble here closes the session
        too: the recipients' results are already decided."""
        try:
            code = 0
            for _ in range(count):
                code, _text = await channel.reply(within)
            if code == 354:
                channel.close()
        except (BadReply, OSError, TimeoutError):
            channel.close()

    def _result(self, rcpt: str, reply: Reply, *, deferred: bool = False) -> RecipientResult:
        if deferred:
            return RecipientResult(rcpt, Outcome.DEFERRED, reply)
        return RecipientResult(rcpt, outcome.classify(reply), reply, outcome.is_throttled(reply))

    def _finish(
        self,
        recipients: list[str],
        results: dict[str, RecipientResult],
        affected: list[str],
        reply: Reply,
        *,
        deferred: bool = False,
    ) -> list[RecipientResult]:
        """Give `reply` to every affected recipient without a result yet; keep input order."""
        for rcpt in affected:
            results.setdefault(rcpt, self._result(rcpt, reply, deferred=deferred))
        return [results[r] for r in recipients]
