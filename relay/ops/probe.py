"""Test connection (`relay test-upstream`, `POST /test-upstream`): one SMTP session to an
upstream from one of the relay's own egress sources, reported step by step.

Customers allowlist the relay's egress IPs, so the probe binds to the egress source the
relay would use (a test from anywhere else proves nothing). It drives aiosmtplib one
command at a time — resolve, connect, TLS (implicit, or STARTTLS then TLS), greeting,
EHLO, AUTH, optionally MAIL / RCPT (then RSET) or a real test message — and records each
step with the server's original reply and, for the common failures, a plain-language hint.
It shares the socket binding, TLS contexts and error classification with delivery
(`relay.delivery.connection`) but never the connection pool: a probe is always a fresh
connection.
"""

from __future__ import annotations

import asyncio
import email.utils
import errno
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import aiosmtplib
from pydantic import ValidationError

from relay.config.build import Builder
from relay.config.model import Config
from relay.config.schema import UpstreamConf
from relay.config.yamlsrc import Located
from relay.core.errors import RelayError
from relay.core.model import EgressSource, Reply, TlsMode, Upstream
from relay.core.redact import REDACTOR, auth_forms, redact
from relay.delivery.connection import (
    MAX_ADDRESSES_TRIED,
    TlsContexts,
    _BindError,
    _connect_socket,
    _peer,
    _ssl_cause,
)
from relay.delivery.outcome import parse_reply
from relay.delivery.providers import classify
from relay.delivery.resolver import Resolver
from relay.delivery.xoauth import mechanism, send_auth
from relay.oauth import TokenBroker, TokenError

log = logging.getLogger("relay.probe")

IMPLICIT_PORTS = (465,)
STARTTLS_PORTS = (25, 587, 2525)


@dataclass
class Step:
    """One step of the session: what we did, whether it worked, what the server said."""

    name: str  # resolve, connect, TLS, greeting, EHLO, STARTTLS, AUTH PLAIN, MAIL, RCPT, DATA, ...
    ok: bool
    detail: str  # one line for people
    reply: str | None = None  # the server's own reply, verbatim (one line)
    hint: str | None = None  # what probably went wrong and what to do
    ms: float = 0.0


@dataclass
class ProbeReport:
    upstream: str
    host: str
    port: int
    tls: str
    source: str  # egress source name
    source_address: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.steps) and bool(self.steps)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def as_text(self) -> str:
        lines = [
            f"test-upstream {self.upstream}: {self.host}:{self.port} tls={self.tls}"
            f" from egress source {self.source} ({self.source_address})"
        ]
        for s in self.steps:
            mark = "ok" if s.ok else "FAILED"
            lines.append(f"{s.name}: {s.detail} ... {mark} ({s.ms:.0f} ms)")
            if s.hint:
                lines.append(f"  hint: {s.hint}")
        lines.append("result: " + ("every step succeeded" if self.ok else "FAILED"))
        return "\n".join(lines)


# -- hints: pure, table-tested --------------------------------------------------------------


def tls_hint(err: ssl.SSLError, upstream: Upstream) -> tuple[str, str]:
    """(detail, hint) for a failed TLS handshake."""
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message or err.reason or str(err)
        code = err.verify_code
        if code == 62 or "hostname mismatch" in why.lower() or "doesn't match" in why.lower():
            return (
                f"certificate verification failed: {why}",
                f"certificate name mismatch: the server's certificate is not valid for"
                f" '{upstream.host}'. Configure the host name the certificate was issued for"
                " (not an IP address or an alias), or have the server's admin fix the certificate.",
            )
        if code == 10 or "expired" in why.lower():
            return (
                f"certificate verification failed: {why}",
                "the server's certificate has expired; its admin must renew it.",
            )
        return (
            f"certificate verification failed: {why}",
            "the certificate is not issued by a CA this machine trusts (self-signed or a"
            " private CA): set ca_file to the CA bundle that issued it; verify_tls: false"
            " encrypts without authenticating the server and is a last resort.",
        )
    reason = (err.reason or str(err)).lower().replace("_", " ")
    if any(
        w in reason
        for w in (
            "wrong version number",
            "record layer failure",
            "packet length too long",
            "unknown protocol",
            "http request",
        )
    ):
        return (
            f"TLS handshake failed: {err.reason or err}",
            f"wrong port for the TLS mode: the server answered in plaintext, so port"
            f" {upstream.port} speaks STARTTLS (or no TLS), not implicit TLS. Use tls: starttls"
            f" (usually port 587), or the server's implicit-TLS port (usually 465).",
        )
    return (
        f"TLS handshake failed: {err.reason or err}",
        "the server and the relay could not agree on TLS (protocol version or ciphers; the"
        " relay requires TLS 1.2 or newer).",
    )


def reply_hint(stage: str, reply: Reply, upstream: Upstream, source: EgressSource) -> str | None:
    """A hint for a refusal at `stage` (greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA)."""
    text = reply.text.lower()
    enh = reply.enhanced or ""
    if reply.code < 400:
        return None
    if stage == "greeting" or (reply.code in (421, 554) and stage in ("EHLO", "connect")):
        return (
            f"the server refuses this client (from {source.address}): usually the egress IP is"
            " not on its allowlist; ask its admin to allow the addresses `relay egress-ips` prints."
        )
    if stage.startswith("AUTH"):
        if reply.code == 535 or enh in ("5.7.8", "4.7.8") or "credential" in text:
            ref = upstream.password.source if upstream.password else "(no password configured)"
            return (
                f"the server refused the username/password: check the username"
                f" '{upstream.username}' and the secret {ref} (re-read by `relay reload`);"
                " some servers want the full address as the username, or an app password."
            )
        if reply.code == 534 or enh == "5.7.9":
            return "the server wants a stronger mechanism or an app-specific password for this account."
        if reply.code == 538 or enh == "5.7.11":
            return "the server allows AUTH only over TLS: use tls: starttls or implicit."
        if reply.code == 454 or reply.code == 504:
            return "the server offers no usable AUTH mechanism (the relay uses PLAIN or LOGIN)."
        return "authentication was refused; the server's reply says why."
    if stage == "MAIL":
        if reply.code >= 500:
            expected = (
                f" (configured from_address: {upstream.from_address})"
                if upstream.from_address
                else ""
            )
            return (
                "sender not permitted: the server does not let this account send as this"
                f" address{expected}. Set from_address to the address the server expects, or"
                " ask its admin to allow the sender."
            )
        return "the server refused the sender for now (greylisting, rate limit or a full queue)."
    if stage == "RCPT":
        if "relay" in text or enh in ("5.7.1", "5.7.0"):
            return (
                "relaying denied: the server will not accept mail for outside recipients from"
                f" this account or IP ({source.address}); authenticate, or ask its admin to allow"
                " relaying."
            )
        if reply.code >= 500:
            return "the recipient was refused (unknown mailbox or policy); the reply says which."
        return "the recipient was refused for now (greylisting or rate limit); try again later."
    if stage == "STARTTLS":
        return "the server refused STARTTLS; without it the relay will not send (use another port or tls mode)."
    if stage == "DATA":
        return "the server refused the message content; the reply says why."
    if reply.code == 421 or enh.startswith("4.7"):
        return "the server asks to slow down or come back later (rate limit)."
    return None


# -- the session ----------------------------------------------------------------------------


class _Stop(Exception):
    """A step failed; later steps are not attempted."""


class _Probe:
    def __init__(
        self,
        upstream: Upstream,
        source: EgressSource,
        timeout: float,
        clock: Callable[[], float],
        tokens: TokenBroker | None = None,
        message: tuple[str, str] | None = None,
    ) -> None:
        self.tokens = tokens
        self.message = message  # (subject, text) of the test message; default: ours
        self.u = upstream
        self.src = source
        self.timeout = timeout
        self.clock = clock
        self.report = ProbeReport(
            upstream.id,
            upstream.host,
            upstream.port,
            upstream.tls.value,
            source.name,
            source.address,
        )
        self._t0 = clock()

    def ok(
        self, name: str, detail: str, reply: Reply | None = None, hint: str | None = None
    ) -> None:
        self._record(Step(name, True, detail, None if reply is None else str(reply), hint))

    def fail(
        self, name: str, detail: str, reply: Reply | None = None, hint: str | None = None
    ) -> NoReturn:
        self._record(Step(name, False, detail, None if reply is None else str(reply), hint))
        raise _Stop

    def _record(self, s: Step) -> None:
        # Every text of the report may quote the server: redacted at the source, so that
        # neither `relay test-upstream` nor the API answer can show a secret it echoed.
        s.detail = redact(s.detail)
        s.reply = None if s.reply is None else redact(s.reply)
        s.hint = None if s.hint is None else redact(s.hint)
        now = self.clock()
        s.ms = round((now - self._t0) * 1000, 1)
        self._t0 = now
        self.report.steps.append(s)

    def restart_clock(self) -> None:
        self._t0 = self.clock()

    def fail_exc(self, name: str, exc: BaseException, peer: str) -> NoReturn:
        """Record a step that ended in an exception, with the best hint we have."""
        hint: str | None
        tls = _ssl_cause(exc)
        if tls is not None:
            detail, hint = tls_hint(tls, self.u)
            self.fail("TLS", detail, hint=hint)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            reply = parse_reply(exc.code, exc.message)
            # a provider's own advice first (relay.delivery.providers), else the generic hint
            verdict = classify(self.u, reply)
            specific = self.u.provider is not None or self.u.auth == "xoauth2"
            hint = verdict.next_step if verdict.pause and specific else None
            self.fail(name, str(reply), reply, hint or reply_hint(name, reply, self.u, self.src))
        if isinstance(exc, aiosmtplib.SMTPTimeoutError | TimeoutError):
            hint = None
            if name == "greeting" and self.u.tls is not TlsMode.IMPLICIT:
                hint = (
                    f"no greeting within {self.timeout:g}s: the server on port {self.u.port} is"
                    " probably waiting for a TLS handshake, i.e. it speaks implicit TLS (SMTPS,"
                    " usually port 465). Use tls: implicit, or its STARTTLS port (usually 587)."
                )
            elif name == "TLS":
                hint = (
                    f"no TLS handshake within {self.timeout:g}s: the server on port"
                    f" {self.u.port} may not speak implicit TLS; try tls: starttls."
                )
            self.fail(name, f"no reply from {peer} within {self.timeout:g}s", hint=hint)
        if isinstance(
            exc, aiosmtplib.SMTPServerDisconnected | ConnectionError | aiosmtplib.SMTPConnectError
        ):
            why: str | None = None
            if name in ("greeting", "TLS"):
                why = (
                    f"the server closed the connection at once: it may refuse {self.src.address}"
                    " (not allowlisted), or expect another TLS mode on this port."
                )
            self.fail(name, f"connection closed by {peer}: {exc}", hint=why)
        self.fail(name, f"{type(exc).__name__}: {exc}")

    async def run(
        self,
        resolver: Resolver,
        contexts: TlsContexts,
        mail_from: str | None,
        rcpt_to: str | None,
        send_to: str | None,
    ) -> ProbeReport:
        u = self.u
        smtp: aiosmtplib.SMTP | None = None
        sock: socket.socket | None = None
        try:
            addresses = await self._resolve(resolver)
            ctx: ssl.SSLContext | None = None
            if u.tls is not TlsMode.NONE:
                try:
                    ctx = await contexts.get(u)
                except (OSError, ValueError) as exc:
                    self.fail(
                        "TLS",
                        f"cannot load ca_file {u.ca_file}: {exc}",
                        hint="fix ca_file: it must be a PEM bundle readable by the relay.",
                    )
            sock, peer = await self._connect(addresses)
            smtp = aiosmtplib.SMTP(
                hostname=u.host,
                sock=sock,
                local_hostname=self.src.ehlo,
                timeout=self.timeout,
                use_tls=u.tls is TlsMode.IMPLICIT,
                start_tls=False,
                tls_context=ctx if u.tls is TlsMode.IMPLICIT else None,
                validate_certs=u.verify_tls,
            )
            await self._greet(smtp, peer)
            if u.tls is TlsMode.STARTTLS:
                assert ctx is not None
                await self._starttls(smtp, peer, ctx)
            if u.tls is TlsMode.NONE:
                self.ok(
                    "TLS",
                    "none: plaintext (allow_plaintext: true); credentials and"
                    " mail cross the network unencrypted",
                )
            await self._auth(smtp, peer)
            if mail_from or rcpt_to or send_to:
                await self._transaction(smtp, peer, mail_from, rcpt_to, send_to)
            self.restart_clock()
            try:
                r = await smtp.quit()
                self.ok("QUIT", str(parse_reply(r.code, r.message)))
            except (aiosmtplib.SMTPException, OSError):
                pass  # a server that hangs up at QUIT has done nothing wrong
        except _Stop:
            pass
        finally:
            if smtp is not None:
                had_transport = smtp.transport is not None
                smtp.close()
                if not had_transport and sock is not None:
                    sock.close()
            elif sock is not None:
                sock.close()
        return self.report

    async def _resolve(self, resolver: Resolver) -> list[str]:
        try:
            addresses = await resolver.resolve(self.u.host, self.src.family)
        except RelayError as exc:
            self.fail(
                "resolve",
                f"{self.u.host}: {exc.reason}",
                hint="the host name does not resolve from this machine: check the spelling,"
                " or pin it under dns.hosts.",
            )
        family = "AAAA" if self.src.family == socket.AF_INET6 else "A"
        if addresses == [self.u.host]:
            self.ok("resolve", f"{self.u.host} is an address literal")
        else:
            self.ok("resolve", f"{self.u.host} {family} {', '.join(addresses)}")
        return addresses

    async def _connect(self, addresses: list[str]) -> tuple[socket.socket, str]:
        u, src = self.u, self.src
        tried = addresses[:MAX_ADDRESSES_TRIED]
        for i, address in enumerate(tried):
            peer = _peer(address, u.port)
            name = f"connect {peer} from {src.address}"
            last = i == len(tried) - 1
            try:
                sock = await _connect_socket(address, u.port, src, self.timeout)
            except _BindError as exc:
                self.fail(
                    name,
                    f"cannot bind egress source {src.name} ({src.address}): {exc}",
                    hint=f"{src.address} is not configured on this machine: add it to an"
                    " interface, or fix egress_sources.",
                )
            except TimeoutError:
                self._soft_fail(
                    name,
                    last,
                    f"timed out after {self.timeout:g}s",
                    f"no answer from {peer} (from {src.address}): a firewall is probably dropping"
                    f" connections from this egress IP, or the port is wrong. Ask the server's admin"
                    f" to allowlist {src.address} for port {u.port} (`relay egress-ips`).",
                )
                continue
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    hint = (
                        f"connection refused: nothing listens on port {u.port} at {address}, or a"
                        f" firewall rejects {src.address}. Check the port, and ask the server's"
                        f" admin to allowlist {src.address}."
                    )
                    detail = "connection refused"
                elif exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
                    hint = f"no route from {src.address} to {address}: check the network and the egress pool."
                    detail = exc.strerror or str(exc)
                else:
                    hint, detail = None, exc.strerror or str(exc)
                self._soft_fail(name, last, detail, hint)
                continue
            self.ok(name, "connected")
            return sock, peer
        raise _Stop

    def _soft_fail(self, name: str, last: bool, detail: str, hint: str | None) -> None:
        """A failed address: recorded; only the last one stops the probe."""
        self._record(Step(name, False, detail, None, hint))
        if last:
            raise _Stop

    def _tls_detail(self, smtp: aiosmtplib.SMTP) -> str:
        obj = smtp.get_transport_info("ssl_object")
        version = obj.version() if obj is not None else "TLS"
        if not self.u.verify_tls:
            return f"{version}, certificate NOT verified (verify_tls: false)"
        names: list[str] = []
        cert = obj.getpeercert() if obj is not None else None
        for kind, value in (cert or {}).get("subjectAltName", ()):
            if kind in ("DNS", "IP Address"):
                names.append(str(value))
        shown = ", ".join(names[:4]) + (" …" if len(names) > 4 else "")
        return f"{version}, certificate for {self.u.host} verified (names: {shown or '?'})"

    async def _greet(self, smtp: aiosmtplib.SMTP, peer: str) -> None:
        implicit = self.u.tls is TlsMode.IMPLICIT
        self.restart_clock()
        try:
            greeting = await smtp.connect(timeout=self.timeout)
        except aiosmtplib.SMTPConnectTimeoutError as exc:
            # aiosmtplib times the TLS handshake and the greeting separately; its message says which.
            stage = "greeting" if "ready message" in str(exc) or not implicit else "TLS"
            self.fail_exc(stage, exc, peer)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.fail_exc(
                "greeting" if _ssl_cause(exc) is None or not implicit else "TLS", exc, peer
            )
        if implicit:
            self.ok("TLS", self._tls_detail(smtp))
        reply = parse_reply(greeting.code, greeting.message)
        self.ok("greeting", str(reply), reply)
        await self._ehlo(smtp, peer)

    async def _ehlo(self, smtp: aiosmtplib.SMTP, peer: str) -> None:
        self.restart_clock()
        try:
            r = await smtp.ehlo(hostname=self.src.ehlo)
            name = f"EHLO {self.src.ehlo}"
        except aiosmtplib.SMTPHeloError as exc:
            if not 500 <= exc.code < 600 or not smtp.is_connected:
                self.fail_exc(f"EHLO {self.src.ehlo}", exc, peer)
            name = f"HELO {self.src.ehlo}"  # RFC 5321 § 3.2: fall back when EHLO is refused
            try:
                r = await smtp.helo(hostname=self.src.ehlo)
            except (aiosmtplib.SMTPException, OSError) as exc2:
                self.fail_exc(name, exc2, peer)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.fail_exc(f"EHLO {self.src.ehlo}", exc, peer)
        first = parse_reply(r.code, r.message.splitlines()[0] if r.message else "")
        ext = " ".join(sorted(k.upper() for k in smtp.esmtp_extensions))
        self.ok(name, f"{first}" + (f" (extensions: {ext})" if ext else ""), first)

    async def _starttls(self, smtp: aiosmtplib.SMTP, peer: str, ctx: ssl.SSLContext) -> None:
        u = self.u
        if not smtp.supports_extension("starttls"):
            self.fail(
                "STARTTLS",
                "not offered by the server",
                hint=f"the server on port {u.port} does not offer STARTTLS, and the relay"
                " never sends in plaintext when TLS is configured. Use the server's"
                " submission port (587) or implicit TLS (465).",
            )
        self.restart_clock()
        try:
            assert smtp.protocol is not None
            r = await smtp.starttls(server_hostname=u.host, tls_context=ctx, timeout=self.timeout)
        except aiosmtplib.SMTPResponseException as exc:
            self.fail_exc("STARTTLS", exc, peer)
        except (aiosmtplib.SMTPException, OSError) as exc:
            if _ssl_cause(exc) is not None:
                self.ok("STARTTLS", "server ready to start TLS")
            self.fail_exc("TLS", exc, peer)
        reply = parse_reply(r.code, r.message)
        self.ok("STARTTLS", str(reply), reply)
        self.ok("TLS", self._tls_detail(smtp))
        await self._ehlo(smtp, peer)

    async def _token(self) -> str:
        """The token step: ask the identity provider now (a test proves the credentials as
        they are, not a cached token), and show who answered, for whom, for how long."""
        u = self.u
        assert u.oauth is not None
        o = u.oauth
        who = f"{o.idp.value} {o.flow.value}, " + ", ".join(
            x for x in (f"tenant {o.tenant}" if o.tenant else "",
                        f"client {o.client_id}" if o.client_id else "",
                        f"for {u.username}") if x
        )
        self.restart_clock()
        try:
            token = await (self.tokens or TokenBroker()).token(u)
        except TokenError as exc:
            verdict = classify(u, Reply(454, f"4.7.0 {exc.text}", "4.7.0"))
            hint = (
                f"the token endpoint could not be reached from this machine: {exc.description}"
                if exc.network else verdict.next_step
            )
            self.fail("token", f"{o.token_endpoint} ({who}): {exc.error}: {exc.description}",
                      hint=hint)
        self.ok("token", f"{o.token_endpoint} ({who}): access token valid"
                f" {token.lifetime:.0f}s")
        return token.value

    async def _oauth(self, smtp: aiosmtplib.SMTP, peer: str) -> None:
        u = self.u
        if u.unavailable:
            self.fail("token", f"not attempted: {u.unavailable}",
                      hint="a credential reference cannot be resolved on this machine; fix it and"
                      " run `relay reload` (or test through the admin API with --api).")
        mech = mechanism(smtp)
        if mech is None:
            have = " ".join(m.upper() for m in smtp.server_auth_methods) or "none"
            self.fail("AUTH", f"the server offers no XOAUTH2 or OAUTHBEARER (offered: {have})",
                      hint="check host, port and TLS mode: Microsoft 365 is smtp.office365.com:587"
                      " STARTTLS, Google smtp.gmail.com:587 STARTTLS.")
        token = await self._token()
        self.restart_clock()
        try:
            r = await send_auth(smtp, mech, u, token)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.fail_exc(f"AUTH {mech}", exc, peer)
        reply = parse_reply(r.code, r.message)
        self.ok(f"AUTH {mech}", f"{reply} (as {u.username})", reply)

    async def _auth(self, smtp: aiosmtplib.SMTP, peer: str) -> None:
        u = self.u
        if u.auth == "xoauth2":
            await self._oauth(smtp, peer)
            return
        if u.auth == "none":
            self.ok("AUTH", "skipped: auth: none")
            return
        if not u.username:
            self.ok("AUTH", "skipped: no username configured for this upstream")
            return
        if u.unavailable:
            self.fail(
                "AUTH",
                f"not attempted: {u.unavailable}",
                hint="the password reference cannot be resolved on this machine; fix the"
                " secret and run `relay reload` (or run this test through the admin API,"
                " which uses the running relay's credentials).",
            )
        offered = [m for m in ("plain", "login") if m in smtp.server_auth_methods]
        if not smtp.supports_extension("auth") or not offered:
            have = " ".join(m.upper() for m in smtp.server_auth_methods) or "none"
            self.fail(
                "AUTH",
                f"the server offers no PLAIN or LOGIN mechanism (offered: {have})",
                hint="AUTH is often offered only after TLS or on the submission port 587;"
                " check the port and TLS mode.",
            )
        password = u.password.reveal() if u.password is not None else ""
        mech = offered[0]
        self.restart_clock()
        try:
            if mech == "plain":
                r = await smtp.auth_plain(u.username, password)
            else:
                r = await smtp.auth_login(u.username, password)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.fail_exc(f"AUTH {mech.upper()}", exc, peer)
        reply = parse_reply(r.code, r.message)
        self.ok(f"AUTH {mech.upper()}", f"{reply} (as {u.username})", reply)

    async def _transaction(
        self,
        smtp: aiosmtplib.SMTP,
        peer: str,
        mail_from: str | None,
        rcpt_to: str | None,
        send_to: str | None,
    ) -> None:
        sender = mail_from or self.u.from_address or f"postmaster@{self.src.ehlo}"
        for name, arg in (("MAIL", sender), ("RCPT", send_to or rcpt_to or sender)):
            self.restart_clock()
            try:
                r = await (smtp.mail(arg) if name == "MAIL" else smtp.rcpt(arg))
            except (aiosmtplib.SMTPException, OSError) as exc:
                self.fail_exc(name, exc, peer)
            reply = parse_reply(r.code, r.message)
            self.ok(f"{name} {'FROM' if name == 'MAIL' else 'TO'}:<{arg}>", str(reply), reply)
        self.restart_clock()
        try:
            if send_to:
                r = await smtp.data(self._test_message(sender, send_to))
                name = "DATA"
            else:
                r = await smtp.rset()  # MAIL/RCPT only: nothing is sent
                name = "RSET"
        except (aiosmtplib.SMTPException, OSError) as exc:
            self.fail_exc("DATA" if send_to else "RSET", exc, peer)
        reply = parse_reply(r.code, r.message)
        self.ok(name, str(reply), reply)

    def _test_message(self, sender: str, to: str) -> bytes:
        host = self.src.ehlo
        if self.message is not None:
            subject, text = self.message
            body = "".join(f"{line}\r\n" for line in text.splitlines())
            return (
                f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
                f"Date: {email.utils.formatdate(localtime=False)}\r\n"
                f"Message-ID: {email.utils.make_msgid(domain=host)}\r\n"
                "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
            ).encode()
        return (
            f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: egress-relay test message\r\n"
            f"Date: {email.utils.formatdate(localtime=False)}\r\n"
            f"Message-ID: {email.utils.make_msgid(domain=host)}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            f"This is a test message sent by `relay test-upstream {self.u.id}` from egress\r\n"
            f"source {self.src.name} ({self.src.address}) through {self.u.host}:{self.u.port}.\r\n"
        ).encode()


async def probe(
    upstream: Upstream,
    source: EgressSource,
    resolver: Resolver,
    *,
    contexts: TlsContexts | None = None,
    mail_from: str | None = None,
    rcpt_to: str | None = None,
    send_to: str | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - per step, not for the whole call
    clock: Callable[[], float] = time.monotonic,
    tokens: TokenBroker | None = None,
    message: tuple[str, str] | None = None,
) -> ProbeReport:
    """Run the test session; never raises for network or SMTP trouble (it is in the report).

    `timeout` bounds each step (connect, handshake, each reply); default: the upstream's
    connect_timeout. MAIL/RCPT are sent (then RSET) when mail_from or rcpt_to is given;
    send_to sends a real, short test message to that address.
    """
    t = timeout if timeout is not None else upstream.connect_timeout
    if upstream.password is not None:  # e.g. an ad-hoc upstream's: not in the config's set
        for value in auth_forms(upstream.password.reveal(), upstream.username):
            REDACTOR.add(value)
    p = _Probe(upstream, source, t, clock, tokens, message)
    try:
        async with asyncio.timeout(t * 12 + 5):  # every loop bounded: the whole probe too
            return await p.run(resolver, contexts or TlsContexts(log), mail_from, rcpt_to, send_to)
    except TimeoutError:
        p.report.steps.append(Step("probe", False, "gave up: the whole test took too long"))
        return p.report


# -- what to test: a configured upstream or an ad-hoc description ----------------------------


class TargetError(ValueError):
    """The test target cannot be built (unknown name, invalid description); safe to show."""


def adhoc_upstream(
    config: Config, description: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> Upstream:
    """An Upstream from a customer server description not yet in a policy, with the keys of
    an `upstreams:` entry in YAML (host, port, tls, username, password *reference*, ...) and
    the same checks as the configuration (a literal password is refused)."""
    try:
        conf = UpstreamConf.model_validate(dict(description))
    except ValidationError as exc:
        raise TargetError(
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: "
                + (
                    "unknown key"
                    if e["type"] == "extra_forbidden"
                    else e["msg"].removeprefix("Value error, ")
                )
                for e in exc.errors(include_url=False)
            )
        ) from None
    builder = Builder(environ)
    up = builder.upstream(
        "ad-hoc",
        conf,
        Located("<ad hoc>", {}, {(): 1}),
        (),
        config.pools,
        config.relay.default_pool,
        config.base_dir,
    )
    if up is None or builder.errors:
        raise TargetError("; ".join(e.message for e in builder.errors))
    return up


def sources_for(
    config: Config,
    upstream: Upstream,
    *,
    pool: str | None = None,
    source: str | None = None,
    all_sources: bool = False,
) -> list[EgressSource]:
    """The egress source(s) to test from: the one named, else the pool the relay would use
    for this upstream (an organisation's own pool for its own upstreams): its first source,
    or every source with all_sources (customers must allowlist each)."""
    if source is not None:
        if source not in config.sources:
            raise TargetError(
                f"unknown egress source '{source}' (sources: {', '.join(config.sources)})"
            )
        return [config.sources[source]]
    if pool is None:
        org_id, slash, _ = upstream.id.partition("/")
        org = config.orgs.get(org_id) if slash else None
        pool = org.pool if org is not None and org.pool else upstream.pool
    if pool not in config.pools:
        raise TargetError(f"unknown egress pool '{pool}' (pools: {', '.join(config.pools)})")
    srcs = list(config.pools[pool].sources)
    return srcs if all_sources else srcs[:1]


def configured_upstream(config: Config, name: str) -> Upstream:
    if name not in config.upstreams:
        raise TargetError(
            f"unknown upstream '{name}' (upstreams: {', '.join(sorted(config.upstreams))})"
        )
    return config.upstreams[name]
