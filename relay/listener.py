"""The SMTP listener: a thin aiosmtpd adapter that turns client sessions into typed Intake calls.

aiosmtpd gives us the connection, the command loop, the STARTTLS switch and the SASL
challenge plumbing. We own every reply the client sees (each with an RFC 3463 enhanced
code), the order of the checks, and the DATA reader. The policy and the spool sit behind
the `Intake` protocol; the listener never talks to an upstream and answers 250 after DATA
only once `Intake.submit` returned a queue id, i.e. once the spool has the message on disk.

Check order (fixed, fail closed, Postfix practice):
    connect  → Intake.check_connect (refuse floods; an unknown network may still AUTH)
    AUTH     → only under TLS; Intake.authenticate; failures counted
    MAIL     → syntax and SIZE, then Intake.check_sender (the relay-access check)
    RCPT     → syntax, recipient count, then Intake.check_recipient
    DATA     → size / line length / bare CR-LF checks while reading, then Intake.submit
Any RelayError (or any other exception) becomes its reply through `relay.errors.to_reply`.

Protocol decisions:
- A DATA body containing a bare CR or a bare LF is rejected (554 5.6.0) after reading to the
  real <CRLF>.<CRLF>, and nothing is submitted: only <CRLF>.<CRLF> ends the data, and a
  body a later hop could split differently is refused outright (SMTP smuggling, 2023;
  Postfix smtpd_forbid_bare_newline, Exim and Sendmail did the same).
- Bytes the client pipelined after STARTTLS are discarded (RFC 3207 § 4.2, CVE-2011-0411);
  aiosmtpd clears its buffer when the handshake completes and a test holds it to that.
- Every 5xx reply counts as a client error except 535 (counted separately as an AUTH
  failure); at max_errors the session ends with 421 4.7.0; a message accepted for
  delivery resets the count (as Postfix does). aiosmtpd itself also hangs up
  after 5 unrecognised commands (its BOGUS_LIMIT), which we report as 421 4.7.0 too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import email.utils
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from aiosmtpd.smtp import SMTP, TLSSetupException

from relay.addresses import AddressSyntaxError, parse_mailbox, parse_params, split_path
from relay.errors import PermanentError, RelayError, to_reply
from relay.model import Envelope, TlsMode
from relay.smtpd_setup import install as _install_smtpd_setup

__all__ = ["Intake", "Listener", "ListenerSettings", "SessionInfo"]

_install_smtpd_setup()  # per-class, not per-connection, AUTH method lookup (see the module)

# Replies we send from more than one place. RFC 5321 § 4.2 codes, RFC 3463 enhanced codes.
R_SHUTDOWN = "421 4.3.2 Service shutting down, closing connection"
R_TIMEOUT = "421 4.4.2 Timeout exceeded, closing connection"
R_TOO_MANY_ERRORS = "421 4.7.0 Too many errors, closing connection"
R_TOO_MANY_AUTH_FAILURES = "421 4.7.0 Too many authentication failures, closing connection"
R_NEED_HELO = "503 5.5.1 Error: send HELO/EHLO first"
R_LINE_TOO_LONG = "500 5.5.2 Line too long (RFC 5321 section 4.5.3.1.6)"
R_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
# 5.6.0 ("other media error", RFC 3463 § 3.7): a registered code for a content format we
# refuse; see the module docstring for why bare CR/LF is refused at all.
R_BARE_NEWLINE = "554 5.6.0 Bare CR or LF in message not accepted (RFC 5321 section 2.3.8)"

# aiosmtpd's own command loop writes these without enhanced status codes (RFC 2034 wants
# one on every reply but the greeting and EHLO/HELO); push() rewrites them.
_LOOP_REPLIES = {
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "500 Error: strict ASCII mode": "500 5.5.2 Error: non-ASCII command",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "554 Command refused due to lack of security": "554 5.7.0 Command refused, TLS failed",
    "502 5.5.1 Too many unrecognized commands, goodbye.": (
        "421 4.7.0 Too many unrecognized commands, closing connection"
    ),
    "220 Ready to start TLS": "220 2.0.0 Ready to start TLS",
}
# aiosmtpd echoes the unknown command back; we do not (it may hold a bare CR).
_UNKNOWN_COMMAND_PREFIX = '500 Error: command "'
_UNKNOWN_COMMAND = "500 5.5.1 Error: command not recognized"

# Seconds a closing connection may take to flush its goodbye before it is aborted.
_CLOSE_FLUSH_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the intake may know about the client when it decides."""

    peer_ip: str
    peer_port: int
    helo: str
    tls: bool
    user: str | None  # authenticated identity


class Intake(Protocol):
    """The policy+spool side of the listener. Raise a RelayError to refuse.

    `authenticate` runs in a worker thread (asyncio.to_thread) so that a slow password
    hash does not stall every other session: it must be thread-safe (a lookup and a hash
    check are)."""

    def check_connect(self, peer_ip: str) -> None: ...

    def authenticate(self, session: SessionInfo, user: str, password: str) -> bool: ...

    def check_sender(self, session: SessionInfo, sender: str) -> None: ...

    def check_recipient(self, session: SessionInfo, sender: str, rcpt: str) -> None: ...

    async def submit(self, session: SessionInfo, envelope: Envelope) -> str: ...


@runtime_checkable
class ConnectionObserver(Protocol):
    """Optional for an Intake: told when a connection that passed check_connect ends (so
    it can count concurrent connections per client)."""

    def connection_closed(self, peer_ip: str) -> None: ...


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    address: str
    port: int  # 0 = ephemeral (tests)
    tls: TlsMode  # NONE plain; STARTTLS offered (require_tls makes it mandatory); IMPLICIT
    cert_file: str | None = None
    key_file: str | None = None
    hostname: str = "localhost"  # greeting banner and Received
    require_tls: bool = False  # STARTTLS listeners: no MAIL before STARTTLS (530 5.7.0)
    require_auth: bool = False  # even allowlisted networks must AUTH
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 1000
    max_line_length: int = 1000  # RFC 5321 § 4.5.3.1.6 text line incl. CRLF
    max_command_length: int = 512  # RFC 5321 § 4.5.3.1.4
    idle_timeout: float = 300.0  # per command (RFC 5321 § 4.5.3.2.7: 5 minutes)
    session_timeout: float = 1800.0  # whole connection
    max_errors: int = 10  # bad commands before 421 4.7.0 and disconnect
    max_auth_failures: int = 3  # then 421 4.7.0 and disconnect


class Listener:
    """One listening socket and the SMTP sessions accepted on it."""

    def __init__(
        self,
        settings: ListenerSettings,
        intake: Intake,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        if settings.tls is not TlsMode.NONE and not (settings.cert_file and settings.key_file):
            raise ValueError(
                f"listener {settings.name}: TLS mode {settings.tls} needs cert and key"
            )
        self.settings = settings
        self.log = logger or logging.getLogger("relay.listener")
        self._intake = intake
        self._server: asyncio.Server | None = None
        self._sessions: set[_SmtpSession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()

    @property
    def intake(self) -> Intake:
        return self._intake

    def set_intake(self, intake: Intake) -> None:
        """Config reload: sessions read the intake at connect, AUTH and MAIL, so new
        sessions and new transactions use this one; a transaction in flight keeps its own."""
        self._intake = intake

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("listener not started")
        return int(self._server.sockets[0].getsockname()[1])

    def _tls_context(self) -> ssl.SSLContext:
        assert self.settings.cert_file and self.settings.key_file
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        return ctx

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind on the running loop (no aiosmtpd Controller thread), or serve `sock`, a
        listening socket inherited from the supervisor (relay/supervisor.py)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        ctx = None if s.tls is TlsMode.NONE else self._tls_context()
        starttls_ctx = ctx if s.tls is TlsMode.STARTTLS else None
        extra: dict[str, Any] = {}
        if s.tls is TlsMode.IMPLICIT:
            extra = {"ssl": ctx, "ssl_handshake_timeout": min(s.idle_timeout, 60.0)}
        if sock is not None:
            extra["sock"] = sock
        else:
            extra.update(host=s.address, port=s.port, reuse_address=True)
        self._server = await loop.create_server(
            lambda: _SmtpSession(self, starttls_ctx, loop), **extra
        )
        self.log.info(
            "listener %s listening on %s port %d (%s)", s.name, s.address, self.port, s.tls
        )

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let transactions in progress finish (up to `grace` seconds);
        every session gets 421 4.3.2 once it is outside a transaction, or when grace ends."""
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            session.begin_drain()
        try:
            if self._sessions:
                await asyncio.wait_for(self._no_sessions.wait(), grace)
        except TimeoutError:
            self.log.warning(
                "listener %s: %d session(s) still open after %.1fs grace, closing them",
                self.settings.name,
                len(self._sessions),
                grace,
            )
            for session in list(self._sessions):
                session.goodbye(R_SHUTDOWN)
            try:
                await asyncio.wait_for(self._no_sessions.wait(), _CLOSE_FLUSH_TIMEOUT + 1.0)
            except TimeoutError:
                self.log.error("listener %s: sessions did not close", self.settings.name)
        try:
            await asyncio.wait_for(self._server.wait_closed(), _CLOSE_FLUSH_TIMEOUT)
        except TimeoutError:
            pass
        self.log.info("listener %s stopped", self.settings.name)

    def _register(self, session: _SmtpSession) -> None:
        self._sessions.add(session)
        self._no_sessions.clear()

    def _unregister(self, session: _SmtpSession) -> None:
        self._sessions.discard(session)
        if not self._sessions:
            self._no_sessions.set()


def _peer_address(peername: object) -> tuple[str, int]:
    if not isinstance(peername, tuple) or len(peername) < 2:
        return "", 0
    ip = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
    # A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; allowlists say a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(peername[1])


def _strip_keyword(keyword: str, arg: str | None) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword) :]


def _valid_helo(arg: str | None) -> bool:
    # A domain or address literal (RFC 5321 § 4.1.1.1): printable ASCII, no spaces. It
    # goes into our Received header, so nothing else is accepted.
    return arg is not None and 0 < len(arg) <= 255 and all("!" <= c <= "~" for c in arg)


def _b64decode(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class _SmtpSession(SMTP):
    """One client connection. Subclassing is how aiosmtpd is extended: each smtp_* method
    here replaces aiosmtpd's so that replies, limits and check order are ours."""

    def __init__(
        self,
        listener: Listener,
        starttls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        s = listener.settings
        self._listener = listener
        self._settings = s
        self._log = listener.log
        self._implicit_tls = s.tls is TlsMode.IMPLICIT
        # Read before super().__init__, which sizes its StreamReader from it: the longest
        # line plus one transparent dot (RFC 5321 § 4.5.2, § 4.5.3.1.6).
        self.line_length_limit = s.max_line_length + 1
        super().__init__(
            None,  # no handler object: the hooks are the methods below
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=s.hostname,
            ident="ESMTP",
            tls_context=starttls_context,
            require_starttls=s.require_tls,
            timeout=s.idle_timeout,
            loop=loop,
        )
        # aiosmtpd keeps command_size_limits in a class-level dict shared by every session
        # and grows it on each EHLO; use a fixed table of our own. MAIL may carry SIZE
        # (+26, RFC 1870 § 3) and SMTPUTF8 (+10, RFC 6531 § 3.4).
        self.command_size_limit = s.max_command_length
        self.command_size_limits = collections.defaultdict(lambda: s.max_command_length)
        self.command_size_limits["MAIL"] = s.max_command_length + 26 + 10
        self._peer_ip = ""
        self._peer_port = 0
        self._errors = 0
        self._auth_failures = 0
        self._closing = False
        self._draining = False
        self._in_data = False
        self._auth_user: str | None = None  # valid while self.session.authenticated
        self._txn_intake: Intake | None = None
        self._connect_intake: Intake | None = None  # the one whose check_connect passed
        self._body_8bit = False
        self._session_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # ---- connection lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self._original_transport is not None
        super().connection_made(transport)
        if after_starttls:
            # RFC 3207 § 4.2: aiosmtpd made a fresh Session (no HELO, no AUTH) and
            # discarded buffered plaintext; our transaction and AUTH state go too.
            self._auth_user = None
            self._log.debug("%s:%d STARTTLS done", self._peer_ip, self._peer_port)
            return
        self._peer_ip, self._peer_port = _peer_address(transport.get_extra_info("peername"))
        assert self.session is not None
        if self._implicit_tls:
            # aiosmtpd only records TLS it negotiated itself; eof_received() needs this.
            self.session.ssl = {"cipher": transport.get_extra_info("cipher")}
        self._session_timer = self.loop.call_later(
            self._settings.session_timeout, self.goodbye, R_TIMEOUT
        )
        self._listener._register(self)
        self._log.debug("%s:%d connected", self._peer_ip, self._peer_port)

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()  # gone: never touch its (reusable) descriptor again
        self._listener._unregister(self)
        opened, self._connect_intake = self._connect_intake, None
        if isinstance(opened, ConnectionObserver):
            try:
                opened.connection_closed(self._peer_ip)
            except Exception:
                self._log.exception("connection_closed hook failed")
        self._log.debug("%s:%d disconnected", self._peer_ip, self._peer_port)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        refusal = self._check_connect()
        if refusal is not None:
            self.goodbye(refusal)
            return
        try:
            await super()._handle_client()
        except ConnectionError:
            pass  # the client went away; connection_lost() cleans up

    def _check_connect(self) -> str | None:
        intake = self._listener.intake
        try:
            intake.check_connect(self._peer_ip)
            self._connect_intake = intake
        except Exception as exc:
            self._log_refusal("connect", exc)
            # Only 421 and 554 may replace the greeting (RFC 5321 § 3.1, § 4.2.3).
            code, _, rest = to_reply(exc).partition(" ")
            return ("421 " if code.startswith("4") else "554 ") + rest
        return None

    def _timeout_cb(self) -> None:
        # RFC 5321 § 4.5.3.2.7: the server may close after its timeout; say why first.
        self._log.info("%s:%d idle timeout", self._peer_ip, self._peer_port)
        self.goodbye(R_TIMEOUT)

    def goodbye(self, reply: str) -> None:
        """Send a final 421 (or greeting refusal) and close; later pushes are dropped."""
        if self._closing:
            return
        self._closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._writer.write(reply.encode("ascii", "replace") + b"\r\n")
        transport.close()
        # close() waits for the peer to read our last bytes; a peer that never reads
        # must not hold the connection open forever. After STARTTLS, abort the socket's own
        # transport: the TLS one waits for the peer's close_notify, and once closed twice
        # (aiosmtpd does) its abort() is a no-op — the session would never end.
        raw = self._original_transport
        self._abort_timer = self.loop.call_later(
            _CLOSE_FLUSH_TIMEOUT, _abort, raw if raw is not None else transport
        )
        # Stop the command loop too: nothing the client pipelined after this point may
        # still run (aiosmtpd's own QUIT does the same).
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def begin_drain(self) -> None:
        """Listener.stop(): finish the transaction in progress, if any, then 421 4.3.2."""
        self._draining = True
        if not self._in_transaction():
            self.goodbye(R_SHUTDOWN)

    # ---- replies -------------------------------------------------------------------------

    async def push(self, status: str | bytes) -> None:
        """Every reply passes here: add enhanced codes to aiosmtpd's, count errors, drain."""
        if self._closing:
            return
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if text.startswith(_UNKNOWN_COMMAND_PREFIX):
            text = _UNKNOWN_COMMAND
        text = _LOOP_REPLIES.get(text, text)
        if text.startswith("421 "):
            # RFC 5321 § 3.8: a 421 reply closes the channel, whichever check raised it.
            self.goodbye(text)
            return
        await super().push(text)
        if len(text) > 3 and text[3] == "-":
            return  # continuation line of a multi-line reply
        code = text[:3]
        if code == "535":
            self._auth_failures += 1
            if self._auth_failures >= self._settings.max_auth_failures:
                self._log.warning("%s:%d too many AUTH failures", self._peer_ip, self._peer_port)
                self.goodbye(R_TOO_MANY_AUTH_FAILURES)
        elif code.startswith("5"):
            self._errors += 1
            if self._errors >= self._settings.max_errors:
                self._log.warning("%s:%d too many errors", self._peer_ip, self._peer_port)
                self.goodbye(R_TOO_MANY_ERRORS)
        if self._draining and not self._in_transaction():
            self.goodbye(R_SHUTDOWN)

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd calls this for anything a command raised: fail closed with 451 4.3.0
        (never its default '500 Error: (Class) text')."""
        if isinstance(error, TLSSetupException):
            self._log.info(
                "%s:%d TLS handshake failed: %r", self._peer_ip, self._peer_port, error.__cause__
            )
        else:
            self._log.error(
                "%s:%d unexpected error", self._peer_ip, self._peer_port, exc_info=error
            )
        reply = to_reply(error)
        if self._in_data:
            # Mid-DATA we no longer know where the message ends: reading on could run
            # message text as commands. Close instead.
            self.goodbye("421 " + reply.partition(" ")[2])
        self._set_rset_state()
        return reply

    def _log_refusal(self, stage: str, exc: BaseException) -> None:
        if isinstance(exc, RelayError):
            self._log.info(
                "%s:%d %s refused: %s (%s)",
                self._peer_ip,
                self._peer_port,
                stage,
                exc.reply(),
                exc.reason,
            )
        else:
            self._log.error(
                "%s:%d %s check failed", self._peer_ip, self._peer_port, stage, exc_info=exc
            )

    # ---- session state -------------------------------------------------------------------

    def _set_rset_state(self) -> None:
        self.envelope = self._create_envelope()  # what aiosmtpd's (untyped) version does
        self._txn_intake = None
        self._body_8bit = False

    def _in_transaction(self) -> bool:
        return self._txn_intake is not None

    def _tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def _user(self) -> str | None:
        assert self.session is not None
        return self._auth_user if self.session.authenticated else None

    def _info(self) -> SessionInfo:
        assert self.session is not None
        return SessionInfo(
            peer_ip=self._peer_ip,
            peer_port=self._peer_port,
            helo=self.session.host_name or "",
            tls=self._tls_active(),
            user=self._user(),
        )

    async def _helo_missing(self) -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push(R_NEED_HELO)
            return True
        return False

    # ---- commands without a transaction --------------------------------------------------

    async def smtp_HELO(self, arg: str | None) -> None:
        if not _valid_helo(arg):
            await self.push("501 5.5.4 Syntax: HELO hostname")
            return
        assert self.session is not None
        self._set_rset_state()  # RFC 5321 § 4.1.4: HELO/EHLO reset like RSET
        self.session.extended_smtp = False
        self.session.host_name = arg
        await self.push(f"250 {self.hostname}")

    async def smtp_EHLO(self, arg: str | None) -> None:
        if not _valid_helo(arg):
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        assert self.session is not None
        self._set_rset_state()
        self.session.extended_smtp = True
        self.session.host_name = arg
        lines = [
            self.hostname,
            "PIPELINING",  # RFC 2920
            f"SIZE {self._settings.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
        ]
        if self.tls_context is not None and not self._tls_active():
            lines.append("STARTTLS")  # RFC 3207
        if self._tls_active():
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954: only offered under TLS
        for i, line in enumerate(lines):
            await self.push(f"250{'-' if i < len(lines) - 1 else ' '}{line}")

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()
        await self.push("250 2.0.0 OK")

    async def smtp_QUIT(self, arg: str | None) -> None:
        self._set_rset_state()
        self.goodbye("221 2.0.0 Bye")

    async def smtp_VRFY(self, arg: str | None) -> None:
        # RFC 5321 § 3.5.3: 252 when we will not verify; a relay has nothing to verify.
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not supported")

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push("214 2.0.0 Commands: AUTH DATA EHLO HELO MAIL NOOP QUIT RCPT RSET STARTTLS")

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
        elif self._tls_active():
            await self.push("503 5.5.1 TLS already active")
        elif self.tls_context is None:
            await self.push("502 5.5.1 STARTTLS not offered")
        else:
            # aiosmtpd replies 220, wraps the transport and, when the handshake is done,
            # drops whatever plaintext the client pipelined after STARTTLS (RFC 3207 § 4.2).
            await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str | None) -> None:
        assert self.session is not None
        if not self.session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if not self._tls_active():
            # RFC 4954 § 6: never accept passwords in the clear.
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self._in_transaction():
            await self.push("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        initial = args[1] if len(args) == 2 else None
        if mechanism == "PLAIN":
            credentials = await self._sasl_plain(initial)
        elif mechanism == "LOGIN":
            credentials = await self._sasl_login(initial)
        else:
            await self.push("504 5.5.4 Unrecognized authentication type")
            return
        if credentials is None:
            return  # a reply was already sent
        user, password = credentials
        intake = self._listener.intake
        try:
            ok = await asyncio.to_thread(intake.authenticate, self._info(), user, password)
        except Exception as exc:
            self._log_refusal("AUTH", exc)
            await self.push(to_reply(exc))
            return
        if ok:
            self.session.authenticated = True
            self._auth_user = user
            self._log.info("%s:%d authenticated as %r", self._peer_ip, self._peer_port, user)
            await self.push("235 2.7.0 Authentication successful")
        else:
            # Never log the password or the AUTH arguments; the user name is fine.
            self._log.info("%s:%d AUTH failed for %r", self._peer_ip, self._peer_port, user)
            await self.push("535 5.7.8 Authentication credentials invalid")

    async def _sasl_response(self, initial: str | None, challenge: str) -> bytes | None:
        """An initial response or the answer to a 334 challenge, base64-decoded."""
        if initial is None:
            blob = await self.challenge_auth(challenge)
            return blob if isinstance(blob, bytes) else None  # aiosmtpd replied 501
        if initial == "=":
            return b""  # RFC 4954 § 4: "=" is an empty initial response
        decoded = _b64decode(initial)
        if decoded is None:
            await self.push("501 5.5.2 Cannot decode base64")
        return decoded

    async def _sasl_plain(self, initial: str | None) -> tuple[str, str] | None:
        blob = await self._sasl_response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\x00")  # RFC 4616: authzid NUL authcid NUL passwd
        try:
            authz, user, password = (p.decode("utf-8") for p in parts)
        except (ValueError, UnicodeDecodeError):
            await self.push("501 5.5.2 Malformed PLAIN response")
            return None
        if authz and authz != user:
            # No proxy authorization: acting as someone else is a failed AUTH.
            await self.push("535 5.7.8 Authentication credentials invalid")
            return None
        return user, password

    async def _sasl_login(self, initial: str | None) -> tuple[str, str] | None:
        user = await self._sasl_response(initial, "Username:")
        if user is None:
            return None
        password = await self._sasl_response(None, "Password:")
        if password is None:
            return None
        try:
            return user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push("501 5.5.2 Malformed LOGIN response")
            return None

    # ---- the mail transaction ------------------------------------------------------------

    def _mail_params(self, params: dict[str, str | None]) -> tuple[bool, bool]:
        """(smtputf8, body_8bit) from MAIL parameters; raises RelayError to refuse."""
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit() or len(size) > 20:
                raise AddressSyntaxError("SIZE takes a number")
            if int(size) > self._settings.max_message_size:
                raise PermanentError(
                    "Message size exceeds fixed maximum message size", code=552, enhanced="5.3.4"
                )
        body = params.pop("BODY", "7BIT")
        if body is None or body.upper() not in ("7BIT", "8BITMIME"):
            raise AddressSyntaxError("BODY takes 7BIT or 8BITMIME")
        smtputf8 = "SMTPUTF8" in params
        if params.pop("SMTPUTF8", None) is not None:
            raise AddressSyntaxError("SMTPUTF8 takes no value")
        # RFC 4954 § 5: accepted from any client, and ignored (we do not trust it).
        params.pop("AUTH", None)
        if params:
            raise PermanentError(
                "MAIL parameters not recognized: " + " ".join(sorted(params)),
                code=555,
                enhanced="5.5.4",
            )
        return smtputf8, body.upper() == "8BITMIME" or smtputf8

    def _ask(self, stage: str, check: Any, *args: Any) -> str | None:
        """Run one synchronous intake check; the reply if it refused (or crashed)."""
        try:
            check(self._info(), *args)
        except Exception as exc:
            self._log_refusal(stage, exc)
            return to_reply(exc)
        return None

    async def smtp_MAIL(self, arg: str | None) -> None:
        assert self.session is not None and self.envelope is not None
        if await self._helo_missing():
            return
        if self._settings.require_auth and not self.session.authenticated:
            await self.push("530 5.7.0 Authentication required")
            return
        if self._in_transaction():
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if self._draining:
            self.goodbye(R_SHUTDOWN)
            return
        rest = _strip_keyword("FROM:", arg)
        if rest is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path, param_text = split_path(rest)
            smtputf8, body_8bit = self._mail_params(parse_params(param_text))
            sender = parse_mailbox(path, smtputf8=smtputf8) if path else ""  # <> is null
        except RelayError as exc:
            await self.push(to_reply(exc))
            return
        intake = self._listener.intake  # this transaction's intake, whatever reload brings
        refusal = self._ask("MAIL", intake.check_sender, sender)
        if refusal is not None:
            await self.push(refusal)
            return
        self._txn_intake = intake
        self._body_8bit = body_8bit
        self.envelope.mail_from = sender
        self.envelope.smtp_utf8 = smtputf8
        await self.push("250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        assert self.envelope is not None
        if await self._helo_missing():
            return
        intake = self._txn_intake
        if intake is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        rest = _strip_keyword("TO:", arg)
        if rest is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path, param_text = split_path(rest)
            if parse_params(param_text):
                raise PermanentError("RCPT parameters not recognized", code=555, enhanced="5.5.4")
            rcpt = parse_mailbox(path, smtputf8=self.envelope.smtp_utf8)
        except RelayError as exc:
            await self.push(to_reply(exc))
            return
        if len(self.envelope.rcpt_tos) >= self._settings.max_recipients:
            await self.push("452 4.5.3 Too many recipients")  # RFC 5321 § 4.5.3.1.10
            return
        refusal = self._ask("RCPT", intake.check_recipient, self.envelope.mail_from, rcpt)
        if refusal is not None:
            await self.push(refusal)
            return
        self.envelope.rcpt_tos.append(rcpt)  # a hook-less aiosmtpd would do this; we must
        await self.push("250 2.1.5 Recipient OK")

    async def smtp_DATA(self, arg: str | None) -> None:
        assert self.envelope is not None
        if await self._helo_missing():
            return
        intake = self._txn_intake
        if intake is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self._in_data = True
        try:
            content, problem = await self._read_data()
        finally:
            self._in_data = False
        if problem is not None:
            self._log.info("%s:%d DATA refused: %s", self._peer_ip, self._peer_port, problem)
            self._set_rset_state()
            await self.push(problem)
            return
        info = self._info()
        envelope = Envelope(
            sender=self.envelope.mail_from or "",
            recipients=tuple(self.envelope.rcpt_tos),
            data=self._received_header() + content,
            client_ip=self._peer_ip,
            client_user=info.user,
            helo=info.helo,
            smtputf8=self.envelope.smtp_utf8,
            # Declared, or 8-bit octets sent anyway: delivery then asks the upstream for
            # 8BITMIME instead of passing undeclared 8-bit data on.
            body_8bit=self._body_8bit or not content.isascii(),
        )
        # Our own work (the spool's fsync) is not client idleness.
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        try:
            # Shielded: a session timeout must not interrupt a spool write half-way; the
            # client then gets no 250 and retries, a duplicate rather than a loss.
            queue_id = await asyncio.shield(intake.submit(info, envelope))
            if not isinstance(queue_id, str) or not queue_id.isprintable() or not queue_id:
                raise TypeError(f"Intake.submit returned {queue_id!r}, not a queue id")
        except Exception as exc:
            self._log_refusal("DATA", exc)
            reply = to_reply(exc)
        else:
            # DEBUG: the mail log's `received` line is the record; an INFO line per message
            # cost ~0.17 ms of the event loop's CPU (benchmarks/RESULTS.md).
            self._log.debug(
                "%s:%d queued %s (%d bytes, %d rcpt)",
                self._peer_ip,
                self._peer_port,
                queue_id,
                len(envelope.data),
                len(envelope.recipients),
            )
            reply = f"250 2.0.0 OK: queued as {queue_id}"
            # Postfix's smtpd_hard_error_limit counts errors "without delivering mail": a
            # long-lived, pooled connection may hit a few bad recipients a day.
            self._errors = 0
        finally:
            self._reset_timeout()
        self._set_rset_state()  # the transaction ends before its final reply goes out
        await self.push(reply)

    async def _read_data(self) -> tuple[bytes, str | None]:
        """Read the message up to <CRLF>.<CRLF>: (unstuffed content, refusal reply or None).

        After a problem the reader keeps going to the real end of data, storing nothing,
        so that the rest of the message can never be taken for commands. Bounded: each
        line is under the idle timer, the whole under the session timer, memory under
        max_message_size.
        """
        limit = self._settings.max_message_size
        max_line = self._settings.max_line_length
        chunks: list[bytes] = []
        size = 0
        problem: str | None = None
        in_long_line = False  # the tail of an over-long line is still to come
        while True:
            try:
                # Only CRLF ends a line (RFC 5321 § 2.3.8); a bare LF or CR stays inside.
                line = await self._reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)
                problem = problem or R_LINE_TOO_LONG
                chunks.clear()
                in_long_line = True
                self._reset_timeout()
                continue
            self._reset_timeout()
            if in_long_line:
                in_long_line = False  # this read ends the over-long line
                continue
            if line == b".\r\n":
                return b"".join(chunks), problem
            size += len(line)
            if problem is not None:
                continue
            if line.startswith(b"."):
                line = line[1:]  # dot transparency, RFC 5321 § 4.5.2
            if len(line) > max_line:
                problem = R_LINE_TOO_LONG
            elif size > limit:
                problem = R_TOO_BIG
            elif b"\r" in line[:-2] or b"\n" in line[:-2]:
                problem = R_BARE_NEWLINE
            if problem is not None:
                chunks.clear()
            else:
                chunks.append(line)

    def _received_header(self) -> bytes:
        """RFC 5321 § 4.4 trace field; `with` keywords from RFC 3848 and RFC 6531."""
        assert self.session is not None and self.envelope is not None
        ip = self._peer_ip
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        if not self.session.extended_smtp:
            protocol = "SMTP"
        else:
            protocol = "UTF8SMTP" if self.envelope.smtp_utf8 else "ESMTP"
            protocol += ("S" if self._tls_active() else "") + ("A" if self._user() else "")
        return (
            f"Received: from {self.session.host_name} ({literal})\r\n"
            f"\tby {self.hostname} (egress-relay) with {protocol};\r\n"
            f"\t{email.utils.formatdate(localtime=True)}\r\n"
        ).encode("ascii")


def _abort(transport: asyncio.BaseTransport) -> None:
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()  # a no-op once the connection is gone
    # Some transports ignore abort() in the middle of a TLS shutdown (uvloop's, under
    # aiosmtpd's STARTTLS layer); shutting the socket down ends the session in any case:
    # the read side sees EOF and the protocol's connection_lost follows.
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        return  # aborted (or lost) as it should be: its descriptor may already be reused
    try:
        # A duplicate, because uvloop's transport socket refuses shutdown(); shutting a
        # duplicate down shuts the one connection down.
        with sock.dup() as dup:
            dup.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone
