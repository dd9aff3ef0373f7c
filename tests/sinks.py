"""Real aiosmtpd SMTP servers that tests deliver to, standing in for SendGrid, Mailjet and
customer servers: TLS (none / STARTTLS / implicit), AUTH, scripted replies, full records.

Async tests use `async with Sink(...) as sink:`; tests that drive a subprocess use
`with ThreadedSink(...) as sink:` (the same sink on its own thread and event loop).

    sink = Sink(tls="starttls", tls_context=ca.server_context("mx.test"),
                auth={"apikey": "secret"},
                script=Script(rcpt={"gone@example.com": "550 5.1.1 no such user"},
                              data=["451 4.3.0 try later"]))

Every accepted message is a `ReceivedMessage` in `sink.messages` (peer IP — the egress
address the client bound to —, AUTH identity, EHLO name, envelope, bytes, TLS or not).
Every connection is a `SessionRecord` in `sink.sessions`, with the commands it sent.
A reply starting with 421 closes the connection after it is sent, as real servers do.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, AnyStr, Literal

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.core.model import TlsMode, Upstream

TlsKind = Literal["none", "starttls", "implicit"]


@dataclass(frozen=True)
class ReceivedMessage:
    peer_ip: str
    auth_identity: str | None
    ehlo: str
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    data: bytes
    timestamp: float
    tls: bool
    session: int  # SessionRecord.number of the connection that carried it


@dataclass
class SessionRecord:
    number: int
    peer_ip: str
    ehlo: str = ""
    tls: bool = False
    auth_identity: str | None = None
    commands: list[str] = field(default_factory=list)  # verbs in order: EHLO, MAIL, RSET, ...
    messages: int = 0
    closed: bool = False


@dataclass
class Script:
    """Scripted replies. Tables are matched on the exact address; `data` and `rset` are
    consumed in order (the first len(data) DATA commands get those replies, later ones
    the default 250). Functions, when given, win over tables; returning None means default.
    """

    mail: Mapping[str, str] = field(default_factory=dict)  # sender → reply ("*" = any)
    rcpt: Mapping[str, str] = field(default_factory=dict)  # recipient → reply ("*" = any)
    data: Sequence[str] = ()
    rset: Sequence[str] = ()
    mail_fn: Callable[[str], str | None] | None = None
    rcpt_fn: Callable[[str], str | None] | None = None
    data_fn: Callable[[Envelope], str | None] | None = None
    data_delay: float = 0.0  # seconds before the final DATA reply, per transaction
    ehlo: bool = True  # False: refuse EHLO with 502 (the client must fall back to HELO)
    # Advertise PIPELINING (RFC 2920), as every major MTA and smarthost does; aiosmtpd
    # reads commands one line at a time, so it serves pipelined groups correctly. False:
    # the client must talk in lock-step.
    pipelining: bool = True


class _SinkSMTP(SMTP):
    """aiosmtpd's server plus connection accounting and 421-closes-the-connection."""

    def __init__(self, sink: Sink, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self._handler = handler
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None and not self._counted
        super().connection_made(transport)
        if first:
            self._counted = True
            peer = transport.get_extra_info("peername")
            self._handler.record = self._sink._session_opened(self, peer[0] if peer else "")
            self._handler.record.tls = transport.get_extra_info("ssl_object") is not None

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        if self._counted and self._handler.record is not None:
            self._sink._session_closed(self, self._handler.record)
            self._counted = False

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        text = status.decode() if isinstance(status, bytes) else status
        if text.startswith("421") and self.transport is not None:
            # RFC 5321 § 3.8: after 421 the server closes the transmission channel.
            self.transport.close()


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.record: SessionRecord | None = None

    def _note(self, verb: str) -> SessionRecord:
        assert self.record is not None
        self.record.commands.append(verb)
        return self.record

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self._note("EHLO")
        if not self.sink.script.ehlo:
            session.extended_smtp = False
            return ["502 5.5.2 Error: command not recognized"]
        session.host_name = hostname
        assert self.record is not None
        self.record.ehlo = hostname
        if self.sink.script.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        record = self._note("HELO")
        session.host_name = hostname
        record.ehlo = hostname
        return f"250 {server.hostname}"

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        record = self._note("STARTTLS")
        record.tls = True
        return True

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._note("RSET")
        return self.sink._next_scripted("rset") or "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self._note("NOOP")
        return "250 OK"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self.sink._oauth_auth(server, args, bearer=False)

    async def auth_OAUTHBEARER(self, server: SMTP, args: list[str]) -> AuthResult:
        return await self.sink._oauth_auth(server, args, bearer=True)

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._note("QUIT")
        return "221 Bye"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._note("MAIL")
        script = self.sink.script
        sender = "" if address == "<>" else address  # the null reverse-path, as in relay.model
        reply = script.mail_fn(sender) if script.mail_fn else None
        reply = reply or script.mail.get(sender) or script.mail.get("*")
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return reply or "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._note("RCPT")
        script = self.sink.script
        reply = script.rcpt_fn(address) if script.rcpt_fn else None
        reply = reply or script.rcpt.get(address) or script.rcpt.get("*")
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return reply or "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        record = self._note("DATA")
        script = self.sink.script
        if script.data_delay:
            await asyncio.sleep(script.data_delay)  # scripted behaviour, not synchronisation
        reply = script.data_fn(envelope) if script.data_fn else None
        reply = reply or self.sink._next_scripted("data") or "250 2.0.0 OK queued"
        if reply.startswith("2"):
            record.messages += 1
            content = envelope.original_content or b""
            self.sink._accept(
                ReceivedMessage(
                    peer_ip=record.peer_ip,
                    auth_identity=record.auth_identity,
                    ehlo=record.ehlo,
                    mail_from="" if envelope.mail_from == "<>" else envelope.mail_from or "",
                    mail_options=list(envelope.mail_options),
                    rcpt_tos=list(envelope.rcpt_tos),
                    data=bytes(content),
                    timestamp=time.time(),
                    tls=record.tls,
                    session=record.number,
                )
            )
        return reply


class Sink:
    """One SMTP server on loopback, started in the running event loop."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsKind = "none",
        tls_context: ssl.SSLContext | None = None,
        auth: Mapping[str, str] | None = None,
        auth_require_tls: bool = True,
        script: Script | None = None,
        smtputf8: bool = True,
        hostname: str = "sink.test",
        server_timeout: float = 300.0,
        oauth: Callable[[str, str], str | None] | None = None,
        oauth_style: Literal["microsoft", "google"] = "microsoft",
        plain_reply: str | None = None,
        oauth_mechanisms: tuple[str, ...] = ("XOAUTH2", "OAUTHBEARER"),
    ) -> None:
        """`oauth(user, token)` → None to accept AUTH XOAUTH2/OAUTHBEARER, else the reply
        (Exchange Online answers at once, e.g. "535 5.7.3 Authentication unsuccessful";
        with oauth_style="google" an error challenge comes first, as Gmail does).
        `plain_reply`: the answer to every PLAIN/LOGIN not in `auth` (e.g. Exchange's
        "535 5.7.139 Authentication unsuccessful, basic authentication is disabled")."""
        if tls != "none" and tls_context is None:
            raise ValueError(f"tls={tls!r} needs a tls_context (CertAuthority.server_context)")
        self.host = host
        self.port = port
        self.tls = tls
        self.script = script or Script()
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionRecord] = []
        self.auth_failures = 0
        self.active = 0
        self.max_concurrent = 0
        self._tls_context = tls_context
        self._auth = dict(auth) if auth is not None else None
        self._auth_require_tls = auth_require_tls
        self._smtputf8 = smtputf8
        self._hostname = hostname
        self._server_timeout = server_timeout
        self._oauth = oauth
        self._oauth_style = oauth_style
        self._plain_reply = plain_reply
        self._oauth_mechanisms = oauth_mechanisms
        self.oauth_users: list[str] = []  # every successful token login, in order
        self._server: asyncio.Server | None = None
        self._protocols: set[_SinkSMTP] = set()
        self._scripted: dict[str, list[str]] = {}
        self._changed = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    # lifecycle -------------------------------------------------------------------------

    async def start(self) -> Sink:
        self.loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._scripted = {"data": list(self.script.data), "rset": list(self.script.rset)}
        self._server = await self.loop.create_server(
            self._factory,
            host=self.host,
            port=self.port,
            ssl=self._tls_context if self.tls == "implicit" else None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        self.drop_connections(abort=True)
        await self._server.wait_closed()
        self._server = None
        try:
            await self.wait_idle(within=2.0)
        except TimeoutError:
            # A connection whose TLS handshake failed may never report connection_lost
            # (it depends on the event loop); it is aborted, so just stop counting it.
            for proto in list(self._protocols):
                if proto._handler.record is not None:
                    self._session_closed(proto, proto._handler.record)

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _factory(self) -> _SinkSMTP:
        handler = _Handler(self)
        kwargs: dict[str, Any] = {
            "hostname": self._hostname,
            "enable_SMTPUTF8": self._smtputf8,
            "timeout": self._server_timeout,
            "loop": self.loop,
        }
        if self.tls == "starttls":
            kwargs["tls_context"] = self._tls_context
        kwargs["auth_exclude_mechanism"] = [
            m for m in ("XOAUTH2", "OAUTHBEARER")
            if self._oauth is None or m not in self._oauth_mechanisms
        ]
        if self._auth is not None or self._oauth is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            # Implicit TLS is TLS from the first byte, which aiosmtpd does not notice.
            kwargs["auth_require_tls"] = self._auth_require_tls and self.tls != "implicit"
        with warnings.catch_warnings():
            # "AUTH without TLS" is a deliberate test setting here, not a mistake.
            warnings.simplefilter("ignore", UserWarning)
            return _SinkSMTP(self, handler, **kwargs)

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if mechanism in ("PLAIN", "LOGIN") and isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            password = data.password.decode("utf-8", "replace")
            if self._auth is not None and user in self._auth and self._auth[user] == password:
                for proto in self._protocols:
                    if proto.session is session and proto._handler.record is not None:
                        proto._handler.record.auth_identity = user
                        proto._handler.record.commands.append("AUTH")
                return AuthResult(success=True, auth_data=user)
        self.auth_failures += 1
        self._notify()
        if self._plain_reply:
            return AuthResult(success=False, handled=False, message=self._plain_reply)
        return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8

    async def _oauth_auth(self, server: SMTP, args: list[str], *, bearer: bool) -> AuthResult:
        assert self._oauth is not None
        if len(args) > 1:
            blob = args[1].encode()
        else:
            got = await server.challenge_auth("")
            if not isinstance(got, bytes):
                return AuthResult(success=False, handled=True)
            blob = base64.b64encode(got)
        try:
            text = base64.b64decode(blob, validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 bad base64")
        fields = dict(
            part.split("=", 1) for part in text.split("\x01") if "=" in part and not part.startswith("n,")
        )
        user = fields.get("user", "")
        if bearer:  # gs2 header: n,a=user,
            head = text.split("\x01", 1)[0]
            user = head[4:].rstrip(",") if head.startswith("n,a=") else ""
        token = fields.get("auth", "").removeprefix("Bearer ")
        refusal = self._oauth(user, token)
        if refusal is None:
            for proto in self._protocols:
                if proto.session is server.session and proto._handler.record is not None:
                    proto._handler.record.auth_identity = user
                    proto._handler.record.commands.append("AUTH")
            self.oauth_users.append(user)
            self._notify()
            return AuthResult(success=True, auth_data=user)
        self.auth_failures += 1
        self._notify()
        if self._oauth_style == "google":
            # Gmail: the error as a base64 JSON challenge, the final reply after the client's
            # empty line (XOAUTH2) or %x01 (OAUTHBEARER).
            await server.challenge_auth(
                json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"})
            )
        return AuthResult(success=False, handled=False, message=refusal)

    # accounting ------------------------------------------------------------------------

    def _session_opened(self, proto: _SinkSMTP, peer_ip: str) -> SessionRecord:
        self._protocols.add(proto)
        record = SessionRecord(number=len(self.sessions) + 1, peer_ip=peer_ip)
        self.sessions.append(record)
        self.active += 1
        self.max_concurrent = max(self.max_concurrent, self.active)
        self._notify()
        return record

    def _session_closed(self, proto: _SinkSMTP, record: SessionRecord) -> None:
        self._protocols.discard(proto)
        record.closed = True
        self.active -= 1
        self._notify()

    def _accept(self, message: ReceivedMessage) -> None:
        self.messages.append(message)
        self._notify()

    def _next_scripted(self, kind: str) -> str | None:
        queue = self._scripted.get(kind)
        return queue.pop(0) if queue else None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # what tests use --------------------------------------------------------------------

    @property
    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpt_tos]

    def drop_connections(self, *, abort: bool = False) -> None:
        """Close every open connection from the server side (an idle timeout), or with
        abort=True drop it without a goodbye (a crash; also what stop() does, so that a TLS
        close never waits for a peer's close_notify)."""
        for proto in list(self._protocols):
            for transport in (proto.transport, proto._original_transport):
                if transport is None:
                    continue
                if abort and isinstance(transport, asyncio.WriteTransport):
                    transport.abort()
                elif not transport.is_closing():
                    transport.close()

    async def wait_until(self, condition: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until `condition()` holds, re-checking whenever the sink's state changes."""
        async with asyncio.timeout(within):
            while not condition():
                await self._changed.wait()

    async def wait_for(self, n: int, within: float = 5.0, *, recipients: bool = False) -> None:
        """Wait until n messages (or n recipients, over all messages) have been accepted."""
        if recipients:
            await self.wait_until(lambda: len(self.recipients) >= n, within)
        else:
            await self.wait_until(lambda: len(self.messages) >= n, within)

    async def wait_idle(self, within: float = 5.0) -> None:
        """Wait until no connection is open."""
        await self.wait_until(lambda: self.active == 0, within)


class ThreadedSink:
    """A `Sink` on its own thread and event loop, for synchronous (subprocess) tests."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.sink: Sink | None = None

    def start(self) -> ThreadedSink:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="sink", daemon=True)
        self._thread.start()
        self.sink = self._call(self._make())
        return self

    async def _make(self) -> Sink:
        return await Sink(**self._kwargs).start()

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self.sink is not None:
            self._call(self.sink.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = None
        self._thread = None

    def __enter__(self) -> ThreadedSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def _sink(self) -> Sink:
        assert self.sink is not None, "ThreadedSink is not started"
        return self.sink

    @property
    def host(self) -> str:
        return self._sink.host

    @property
    def port(self) -> int:
        return self._sink.port

    @property
    def messages(self) -> list[ReceivedMessage]:
        return list(self._sink.messages)

    @property
    def sessions(self) -> list[SessionRecord]:
        return list(self._sink.sessions)

    @property
    def recipients(self) -> list[str]:
        return self._sink.recipients

    @property
    def max_concurrent(self) -> int:
        return self._sink.max_concurrent

    def wait_for(self, n: int, within: float = 5.0, *, recipients: bool = False) -> None:
        self._call(self._sink.wait_for(n, within, recipients=recipients), within + 5)

    def wait_idle(self, within: float = 5.0) -> None:
        self._call(self._sink.wait_idle(within), within + 5)

    def drop_connections(self, *, abort: bool = False) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self._sink.drop_connections(abort=abort))


def loopback_upstream(port: int, **kw: object) -> Upstream:
    """An Upstream for the delivery tests: "mx.test" (pinned to 127.0.0.1 by their
    resolver) on `port`, plain, short timeouts; `kw` overrides any field."""
    values: dict[str, object] = {
        "id": "up",
        "host": "mx.test",
        "port": port,
        "tls": TlsMode.NONE,
        "pool": "default",
        "connect_timeout": 2.0,
        "command_timeout": 2.0,
    }
    values.update(kw)
    return Upstream(**values)  # type: ignore[arg-type]
