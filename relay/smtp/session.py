"""One SMTP session of our own asyncio.Protocol server, turning a client's commands into
typed Intake calls.

Each connection is one `SmtpSession`, a state machine driven by `data_received`: complete
CRLF lines are cut out of one input buffer and dispatched synchronously (a dict of command
handlers); the session only goes async where it must wait for someone else — the spool's
fsync behind `Intake.submit`, the password hash behind `Intake.authenticate`, and the TLS
handshake — and stops reading from the client while it waits. Replies to commands that
arrived together go out in one write (RFC 2920 pipelining, server side). We own every
reply the client sees (each with an RFC 3463 enhanced code), the order of the checks, and
the DATA reader. The policy and the spool sit behind the `Intake` protocol; the listener
never talks to an upstream and answers 250 after DATA only once `Intake.submit` returned a
queue id, i.e. once the spool has the message on disk.

Check order (fixed, fail closed, Postfix practice):
    connect  → Intake.check_connect (refuse floods; an unknown network may still AUTH)
    AUTH     → only under TLS; Intake.authenticate; failures counted
    MAIL     → syntax and SIZE, then Intake.check_sender (the relay-access check)
    RCPT     → syntax, recipient count, then Intake.check_recipient
    DATA     → size / line length / bare CR-LF checks on the whole body, then Intake.submit
Any RelayError (or any other exception) becomes its reply through `relay.errors.to_reply`.

Protocol decisions:
- Only CRLF ends a line, in commands and in DATA (RFC 5321 § 2.3.8).
- DATA is read in bulk: the body ends at the first <CRLF>.<CRLF> (the CRLF of the DATA
  command counts as the first), is dot-unstuffed in one pass (RFC 5321 § 4.5.2) and checked
  with whole-buffer operations. A body containing a bare CR or a bare LF is rejected
  (554 5.6.0) after reading to the real <CRLF>.<CRLF>, and nothing is submitted: a body a
  later hop could split differently is refused outright (SMTP smuggling, 2023; Postfix
  smtpd_forbid_bare_newline, Exim and Sendmail did the same). When a body has several
  problems, the reply is for the first offending line, as a line-by-line reader would say.
- A body containing a NUL is refused the same way (554 5.6.0; Postfix's
  message_reject_characters = \0): a lenient next hop may end a line or the data there.
- When DATA is refused, bytes the client already pipelined after it are its message text,
  not commands: they are discarded and the session ends with 421 4.5.0.
- Bytes the client pipelined after STARTTLS are discarded (RFC 3207 § 4.2, CVE-2011-0411):
  reading stops at the STARTTLS line and the buffer is cleared before the handshake.
- Every 5xx reply counts as a client error except 535 (counted separately as an AUTH
  failure); at max_errors the session ends with 421 4.7.0; a message accepted for
  delivery resets the count (as Postfix does). The fifth unrecognised command also ends
  the session with 421 4.7.0, whatever max_errors says.
- Memory per session is bounded: a command line by max_line_length (longer ones are
  skipped to their end and answered 500 5.5.2), a message by max_message_size (a longer
  one is read to its end keeping only the last few bytes, then refused 552 5.3.4); while a
  submit or AUTH check is in flight, or while the client does not read our replies (the
  transport's write buffer is over its high-water mark), we stop reading from it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, cast

from relay.core.dsn import DsnParams, RcptDsn
from relay.core.errors import PermanentError, RelayError, to_reply
from relay.core.model import Envelope, TlsMode
from relay.smtp.addresses import AddressSyntaxError, parse_mailbox, parse_params, split_path
from relay.smtp.bodycheck import body_problem, examine
from relay.smtp.dsnparams import mail_dsn, rcpt_dsn
from relay.smtp.interfaces import ConnectionObserver, Intake, SessionInfo, SessionOwner, is_observer
from relay.smtp.proxyproto import ProxyError
from relay.smtp.proxyproto import parse as parse_proxy
from relay.smtp.received import received_header
from relay.smtp.replies import (
    R_BAD_SYNTAX,
    R_COMMAND_TOO_LONG,
    R_LINE_TOO_LONG,
    R_NEED_HELO,
    R_NEED_STARTTLS,
    R_PIPELINED_AFTER_DATA,
    R_SHUTDOWN,
    R_TIMEOUT,
    R_TOO_BIG,
    R_TOO_MANY_AUTH_FAILURES,
    R_TOO_MANY_ERRORS,
    R_TOO_MANY_UNKNOWN,
    R_UNKNOWN_COMMAND,
)
from relay.smtp.syntax import (
    b64decode,
    decode_plain,
    mail_params,
    peer_address,
    strip_keyword,
    valid_helo,
)

# Unrecognised commands before the session ends (aiosmtpd's BOGUS_LIMIT, kept).
_MAX_UNKNOWN_COMMANDS = 5
# RFC 3207 § 4: what a require_tls listener accepts before STARTTLS.
_ALLOWED_BEFORE_STARTTLS = frozenset({"NOOP", "EHLO", "STARTTLS", "QUIT"})
# MAIL may carry SIZE (+26, RFC 1870 § 3), SMTPUTF8 (+10, RFC 6531 § 3.4), RET and ENVID
# (+100 for ENVID, RFC 3461 § 5, and their keywords) after EHLO; RCPT may carry ORCPT (+500,
# RFC 3461 § 5) and NOTIFY.
_MAIL_EXTRA_LENGTH = 26 + 10 + 100 + 20
_RCPT_EXTRA_LENGTH = 500 + 50
# Seconds a closing connection may take to flush its goodbye before it is aborted.
CLOSE_FLUSH_TIMEOUT = 5.0
# The end of DATA (RFC 5321 § 4.1.1.4); the body buffer starts with the DATA line's CRLF.
_END_OF_DATA = b"\r\n.\r\n"

# Session states: what the next complete line is (_PROXY: a PROXY protocol header first).
_COMMAND, _DATA, _SASL, _PROXY = 0, 1, 2, 3


class SmtpSession(asyncio.Protocol):
    """One client connection: the SMTP state machine (see the module docstring)."""

    def __init__(
        self,
        listener: SessionOwner,
        starttls_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        s = listener.settings
        self._listener = listener
        self._settings = s
        self._log = listener.log
        self._loop = loop
        self._starttls_context = starttls_context
        self._require_tls = s.require_tls and starttls_context is not None
        self._tls = s.tls is TlsMode.IMPLICIT  # TLS active (implicit, or after STARTTLS)
        self._transport: asyncio.Transport | None = None
        self._raw_transport: asyncio.Transport | None = None  # the socket's, after STARTTLS
        self._peer_ip = ""
        self._peer_port = 0
        # Input: one buffer; `_state` says what its next line is.
        self._buf = bytearray()
        self._state = _COMMAND
        self._skipping = False  # discarding the rest of an over-long line
        self._scan = 0  # DATA: where to look for the end marker next
        self._data_problem: str | None = None  # DATA: refused already, reading to the end
        self._sasl_step: Callable[[bytes], None] | None = None
        self._login_user = b""
        # Output: replies to flush in one write.
        self._out: list[bytes] = []
        # Flow control and the one task a session may have in flight.
        self._task: asyncio.Task[None] | None = None
        self._task_is_ours = False  # submit/AUTH: our work, not client idleness
        self._tls_pending = False
        self._reading = True
        self._write_paused = False
        self._eof = False
        self._closing = False
        self._lost = False
        self._draining = False
        # Timers: one timer handle; activity is a timestamp, not a timer per line.
        self._timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._last_active = 0.0
        self._session_deadline = 0.0
        # SMTP session state.
        self._helo: str | None = None
        self._extended = False
        self._auth_user: str | None = None
        self._errors = 0
        self._auth_failures = 0
        self._unknown_commands = 0
        self._info_cache: SessionInfo | None = None
        self._connect_intake: Intake | None = None  # the one whose check_connect passed
        # The mail transaction.
        self._txn_intake: Intake | None = None
        self._mail_from = ""
        self._rcpts: list[str] = []
        self._smtputf8 = False
        self._body_8bit = False
        self._ret: str | None = None  # RFC 3461 parameters of this transaction
        self._envid: str | None = None
        self._rcpt_dsn: list[tuple[str, RcptDsn]] = []

    # ---- connection lifecycle ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._peer_ip, self._peer_port = peer_address(transport.get_extra_info("peername"))
        s = self._settings
        now = self._loop.time()
        self._last_active = now
        self._session_deadline = now + s.session_timeout
        self._timer = self._loop.call_at(
            min(now + s.idle_timeout, self._session_deadline), self._on_timer
        )
        self._listener.register(self)
        self._log.debug("%s:%d connected", self._peer_ip, self._peer_port)
        if s.proxy_from:
            if not _within(self._peer_ip, s.proxy_from):
                # A PROXY listener serves its balancers only: anyone else would be taken
                # for a balancer, or skip the per-client checks the balancer's header feeds.
                self._log.warning("%s:%d is not a configured load balancer (proxy_from)",
                                  self._peer_ip, self._peer_port)
                self.goodbye("554 5.7.1 This port accepts connections from its load balancer only")
                return
            self._state = _PROXY  # the greeting waits for the header naming the client
            return
        refusal = self._check_connect()
        if refusal is not None:
            self.goodbye(refusal)
            return
        transport.write(f"220 {s.hostname} ESMTP\r\n".encode())

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

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._abort_timer is not None:
            self._abort_timer.cancel()  # gone: never touch its (reusable) descriptor again
        self._buf = bytearray()
        opened, self._connect_intake = self._connect_intake, None
        if opened is not None and is_observer(opened):
            try:
                cast(ConnectionObserver, opened).connection_closed(self._peer_ip)
            except Exception:
                self._log.exception("connection_closed hook failed")
        self._log.debug("%s:%d disconnected", self._peer_ip, self._peer_port)
        if self._task is None:
            self._listener.unregister(self)
        # else: the submit in flight still finishes (a spool write is never cut half-way);
        # it unregisters the session when it is done, so that stop() waits for it.

    def eof_received(self) -> bool:
        self._eof = True
        # The client half-closed. With a submit in flight on a plain connection, keep our
        # side open so that its reply still goes out; TLS cannot stay half-open.
        return self._task is not None and not self._tls_pending and self._raw_transport is None and (
            self._settings.tls is not TlsMode.IMPLICIT
        )

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands (backpressure).
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing or self._tls_pending:
            return
        want = self._task is None and not self._write_paused
        if want != self._reading:
            self._reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self._loop.time()
        if now >= self._session_deadline:
            self.goodbye(R_TIMEOUT)
            return
        idle = self._settings.idle_timeout
        if self._task_is_ours:
            deadline = now + idle  # our own work (the spool's fsync) is not client idleness
        elif now >= self._last_active + idle:
            # RFC 5321 § 4.5.3.2.7: the server may close after its timeout; say why first.
            self._log.info("%s:%d idle timeout", self._peer_ip, self._peer_port)
            self.goodbye(R_TIMEOUT)
            return
        else:
            deadline = self._last_active + idle
        self._timer = self._loop.call_at(min(deadline, self._session_deadline), self._on_timer)

    def goodbye(self, reply: str) -> None:
        """Send a final 421 (or greeting refusal) and close; later replies are dropped and
        nothing the client pipelined after this point runs."""
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._tls_pending:
            _abort(transport)  # mid-handshake: no reply can be read; end the connection
            return
        self._out.append(reply.encode("ascii", "replace") + b"\r\n")
        transport.write(b"".join(self._out))
        self._out.clear()
        transport.close()
        # close() waits for the peer to read our last bytes; a peer that never reads must
        # not hold the connection open forever. After STARTTLS, abort the socket's own
        # transport: the TLS one waits for the peer's close_notify.
        raw = self._raw_transport
        self._abort_timer = self._loop.call_later(
            CLOSE_FLUSH_TIMEOUT, _abort, raw if raw is not None else transport
        )

    def begin_drain(self) -> None:
        """Listener.stop(): finish the transaction in progress, if any, then 421 4.3.2."""
        self._draining = True
        if self._txn_intake is None:
            self.goodbye(R_SHUTDOWN)

    # ---- input ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # No plaintext arrives here after STARTTLS: the STARTTLS line stopped reading
        # from the socket, and from then on its bytes go to the TLS layer; what this gets
        # during the handshake is already-decrypted data, kept for when TLS is up.
        if self._closing:
            return
        if b"\n" in data:
            self._last_active = self._loop.time()  # the idle timer restarts with each line
        self._buf += data
        if self._task is None:
            self._process()
            self._flush()

    def _process(self) -> None:
        """Handle every complete line (or the whole DATA body) in the buffer, in order."""
        cap = self._settings.max_line_length + 1
        while not self._closing and self._task is None:
            if self._state == _PROXY:
                if not self._proxy_step():
                    return
                continue
            if self._state == _DATA:
                if not self._data_step():
                    return
                continue
            buf = self._buf  # a new one after DATA
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > cap:
                    # Over-long: drop it (keep a last CR the LF may follow) and skip to its end.
                    del buf[:-1]
                    self._skipping = True
                return
            if self._skipping or i > cap:
                self._skipping = False
                del buf[: i + 2]
                self._state = _COMMAND  # an over-long SASL answer also ends the exchange
                self._reply(R_COMMAND_TOO_LONG)
                continue
            line = bytes(buf[:i])
            del buf[: i + 2]
            try:
                if self._state == _SASL:
                    self._sasl_line(line)
                else:
                    self._command(line)
            except Exception as exc:
                self._crashed(exc)

    def _proxy_step(self) -> bool:
        """The PROXY header (relay/smtp/proxyproto.py): the real client, then the connect
        check and the greeting. False to wait for more bytes (or after refusing)."""
        try:
            header = parse_proxy(self._buf)
        except ProxyError as exc:
            self._log.warning("%s:%d %s", self._peer_ip, self._peer_port, exc)
            self._buf.clear()
            self.goodbye("421 4.7.0 Invalid PROXY protocol header, closing connection")
            return False
        if header is None:
            return False  # bounded: the parser refuses a header over its size limit
        del self._buf[: header.length]
        if header.source is not None:
            balancer = self._peer_ip
            self._peer_ip, self._peer_port = header.source
            self._log.debug("%s:%d via load balancer %s", self._peer_ip, self._peer_port,
                            balancer)
        self._state = _COMMAND
        self._info_cache = None
        refusal = self._check_connect()
        if refusal is not None:
            self.goodbye(refusal)
            return False
        self._out.append(f"220 {self._settings.hostname} ESMTP\r\n".encode())
        return True

    def _command(self, line: bytes) -> None:
        if not line:
            self._reply(R_BAD_SYNTAX)
            return
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.upper().decode("ascii")
        except UnicodeDecodeError:
            self._reply(R_BAD_SYNTAX)
            return
        # Arguments may be UTF-8 (RFC 6531); surrogateescape keeps invalid bytes visible to
        # the address checks, which refuse them.
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") if arg_bytes else None
        limit = self._settings.max_command_length  # RFC 5321 § 4.5.3.1.4
        if verb == "MAIL" and self._extended:
            limit += _MAIL_EXTRA_LENGTH
        elif verb == "RCPT" and self._extended:
            limit += _RCPT_EXTRA_LENGTH
        if len(line) > limit:
            self._reply(R_COMMAND_TOO_LONG)
            return
        if self._require_tls and not self._tls and verb not in _ALLOWED_BEFORE_STARTTLS:
            self._reply(R_NEED_STARTTLS)  # RFC 3207 § 4
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._unknown_commands += 1
            if self._unknown_commands >= _MAX_UNKNOWN_COMMANDS:
                self._log.warning(
                    "%s:%d too many unrecognized commands", self._peer_ip, self._peer_port
                )
                self.goodbye(R_TOO_MANY_UNKNOWN)
            else:
                self._reply(R_UNKNOWN_COMMAND)
            return
        handler(self, arg)
        if verb == "DATA" and self._state != _DATA and self._buf and not self._closing:
            # DATA was refused, yet the client sent more after it without waiting for our
            # answer: that is its message text (RFC 2920 § 3.1: the text only follows a 354),
            # never commands. Drop it and end the session (Postfix:
            # smtpd_forbid_unauth_pipelining); text arriving later cannot be told apart.
            self._log.info(
                "%s:%d input pipelined after a refused DATA, closing",
                self._peer_ip,
                self._peer_port,
            )
            self._buf.clear()
            self.goodbye(R_PIPELINED_AFTER_DATA)

    def _crashed(self, exc: Exception) -> None:
        """A bug in a command handler: fail closed with 451 4.3.0 (never a traceback)."""
        self._log.error("%s:%d unexpected error", self._peer_ip, self._peer_port, exc_info=exc)
        reply = to_reply(exc)
        if self._state == _DATA:
            # Mid-DATA we no longer know where the message ends: reading on could run
            # message text as commands. Close instead.
            self.goodbye("421 " + reply.partition(" ")[2])
            return
        self._state = _COMMAND
        self._set_rset_state()
        self._reply(reply)

    # ---- replies -------------------------------------------------------------------------

    def _reply(self, text: str) -> None:
        """Every reply passes here: queue it, count errors, end the session when due."""
        if self._closing:
            return
        if text.startswith("421 "):
            # RFC 5321 § 3.8: a 421 reply closes the channel, whichever check raised it.
            self.goodbye(text)
            return
        self._out.append(text.encode() + b"\r\n")
        code = text[:3]
        if code == "535":
            self._auth_failures += 1
            if self._auth_failures >= self._settings.max_auth_failures:
                self._log.warning("%s:%d too many AUTH failures", self._peer_ip, self._peer_port)
                self.goodbye(R_TOO_MANY_AUTH_FAILURES)
        elif code[0] == "5":
            self._errors += 1
            if self._errors >= self._settings.max_errors:
                self._log.warning("%s:%d too many errors", self._peer_ip, self._peer_port)
                self.goodbye(R_TOO_MANY_ERRORS)
        if self._draining and self._txn_intake is None:
            self.goodbye(R_SHUTDOWN)

    def _flush(self) -> None:
        if self._out and not self._closing:
            assert self._transport is not None
            self._transport.write(b"".join(self._out))
            self._out.clear()

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

    # ---- waiting for someone else ---------------------------------------------------------

    def _start(self, coro: Coroutine[Any, Any, None], *, ours: bool) -> None:
        """Run `coro` (the session's one task) and stop reading until it is done."""
        self._task_is_ours = ours
        self._task = self._loop.create_task(coro)
        self._update_reading()

    def _task_done(self) -> bool:
        """Called by the task as it ends; False when the connection is gone meanwhile."""
        self._task = None
        self._task_is_ours = False
        self._last_active = self._loop.time()
        if self._lost:
            self._listener.unregister(self)
            return False
        return not self._closing

    def _resume(self) -> None:
        """After a task: answer what it decided, then go on with what the client sent."""
        self._process()
        self._flush()
        self._update_reading()
        if self._eof and self._task is None and not self._closing:
            assert self._transport is not None
            self._closing = True
            self._transport.close()  # the half-closed client has had every reply

    # ---- session state -------------------------------------------------------------------

    def _set_rset_state(self) -> None:
        self._txn_intake = None
        self._mail_from = ""
        self._rcpts = []
        self._smtputf8 = False
        self._body_8bit = False
        self._ret = self._envid = None
        self._rcpt_dsn = []

    def _info(self) -> SessionInfo:
        info = self._info_cache
        if info is None:
            info = self._info_cache = SessionInfo(
                peer_ip=self._peer_ip,
                peer_port=self._peer_port,
                helo=self._helo or "",
                tls=self._tls,
                user=self._auth_user,
                listener=self._settings.name,
            )
        return info

    def _helo_missing(self) -> bool:
        if not self._helo:
            self._reply(R_NEED_HELO)
            return True
        return False

    # ---- commands without a transaction --------------------------------------------------

    def smtp_HELO(self, arg: str | None) -> None:
        if not valid_helo(arg):
            self._reply("501 5.5.4 Syntax: HELO hostname")
            return
        self._set_rset_state()  # RFC 5321 § 4.1.4: HELO/EHLO reset like RSET
        self._extended = False
        self._helo = arg
        self._info_cache = None
        self._reply(f"250 {self._settings.hostname}")

    def smtp_EHLO(self, arg: str | None) -> None:
        if not valid_helo(arg):
            self._reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()
        self._extended = True
        self._helo = arg
        self._info_cache = None
        lines = [
            self._settings.hostname,
            "PIPELINING",  # RFC 2920
            f"SIZE {self._settings.max_message_size}",  # RFC 1870
            "8BITMIME",  # RFC 6152
            "SMTPUTF8",  # RFC 6531
            "ENHANCEDSTATUSCODES",  # RFC 2034
            "DSN",  # RFC 3461
        ]
        if self._starttls_context is not None and not self._tls:
            lines.append("STARTTLS")  # RFC 3207
        if self._tls:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954: only offered under TLS
        last = len(lines) - 1
        self._reply("\r\n".join(f"250{'-' if i < last else ' '}{x}" for i, x in enumerate(lines)))

    def smtp_NOOP(self, arg: str | None) -> None:
        self._reply("250 2.0.0 OK")

    def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: RSET")
            return
        self._set_rset_state()
        self._reply("250 2.0.0 OK")

    def smtp_QUIT(self, arg: str | None) -> None:
        self._set_rset_state()
        self.goodbye("221 2.0.0 Bye")

    def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:  # RFC 5321 § 4.1.1.6: VRFY SP String
            self._reply("501 5.5.4 Syntax: VRFY <address>")
            return
        # RFC 5321 § 3.5.3: 252 when we will not verify; a relay has nothing to verify.
        self._reply("252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str | None) -> None:
        self._reply("502 5.5.1 EXPN not supported")

    def smtp_HELP(self, arg: str | None) -> None:
        self._reply("214 2.0.0 Commands: AUTH DATA EHLO HELO MAIL NOOP QUIT RCPT RSET STARTTLS")

    def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            self._reply("501 5.5.4 Syntax: STARTTLS")
        elif self._tls:
            self._reply("503 5.5.1 TLS already active")
        elif self._starttls_context is None:
            self._reply("502 5.5.1 STARTTLS not offered")
        else:
            self._reply("220 2.0.0 Ready to start TLS")
            if self._closing:
                return
            self._flush()
            # RFC 3207 § 4.2: whatever the client sent after STARTTLS in the clear is gone;
            # from here on its bytes belong to the TLS layer.
            self._buf.clear()
            self._tls_pending = True
            assert self._transport is not None
            self._transport.pause_reading()  # nothing more for us until TLS is up
            self._reading = False
            self._start(self._starttls(self._transport, self._starttls_context), ours=False)

    async def _starttls(self, transport: asyncio.Transport, ctx: ssl.SSLContext) -> None:
        try:
            tls_transport = await self._loop.start_tls(
                transport,
                self,
                ctx,
                server_side=True,
                ssl_handshake_timeout=min(self._settings.idle_timeout, 60.0),
            )
        except Exception as exc:
            self._tls_pending = False
            if not self._closing:
                self._log.info(
                    "%s:%d TLS handshake failed: %r", self._peer_ip, self._peer_port, exc
                )
                self._closing = True
            _abort(transport)
            self._task_done()
            return
        self._tls_pending = False
        self._raw_transport = transport
        self._transport = tls_transport
        self._reading = True
        self._tls = True
        # RFC 3207 § 4.2: a fresh session: no HELO, no AUTH, no transaction.
        self._helo = None
        self._extended = False
        self._auth_user = None
        self._info_cache = None
        self._set_rset_state()
        self._log.debug("%s:%d STARTTLS done", self._peer_ip, self._peer_port)
        if self._task_done():
            self._resume()

    def smtp_AUTH(self, arg: str | None) -> None:
        if not self._extended:
            self._reply("503 5.5.1 Error: send EHLO first")
            return
        if not self._tls:
            # RFC 4954 § 6: never accept passwords in the clear.
            self._reply("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self._auth_user is not None:
            self._reply("503 5.5.1 Already authenticated")
            return
        if self._txn_intake is not None:
            self._reply("503 5.5.1 AUTH not permitted during a mail transaction")
            return
        args = (arg or "").split()
        if not 1 <= len(args) <= 2:
            self._reply("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        mechanism = args[0].upper()
        initial = args[1] if len(args) == 2 else None
        if mechanism == "PLAIN":
            step, challenge = self._sasl_plain, ""
        elif mechanism == "LOGIN":
            step, challenge = self._sasl_login_user, "Username:"
        else:
            self._reply("504 5.5.4 Unrecognized authentication type")
            return
        if initial is None:
            self._challenge(challenge, step)
            return
        if initial == "=":
            blob: bytes | None = b""  # RFC 4954 § 4: "=" is an empty initial response
        else:
            blob = b64decode(initial)
        if blob is None:
            self._reply("501 5.5.2 Cannot decode base64")
            return
        step(blob)

    def _challenge(self, text: str, step: Callable[[bytes], None]) -> None:
        """Send a 334 challenge (RFC 4954 § 4); the next line is the client's answer."""
        self._reply("334 " + base64.b64encode(text.encode()).decode())
        self._state = _SASL
        self._sasl_step = step

    def _sasl_line(self, line: bytes) -> None:
        step, self._sasl_step = self._sasl_step, None
        self._state = _COMMAND
        assert step is not None
        blob = line.strip()
        if blob == b"*":
            self._reply("501 5.7.0 Auth aborted")  # RFC 4954 § 4: the client cancelled
            return
        decoded = b64decode(blob)
        if decoded is None:
            self._reply("501 5.5.2 Can't decode base64")
            return
        step(decoded)

    def _sasl_plain(self, blob: bytes) -> None:
        decoded = decode_plain(blob)
        if decoded is None:
            self._reply("501 5.5.2 Malformed PLAIN response")
            return
        authz, user, password = decoded
        if authz and authz != user:
            # No proxy authorization: acting as someone else is a failed AUTH.
            self._reply("535 5.7.8 Authentication credentials invalid")
            return
        self._check_password(user, password)

    def _sasl_login_user(self, blob: bytes) -> None:
        self._login_user = blob
        self._challenge("Password:", self._sasl_login_password)

    def _sasl_login_password(self, blob: bytes) -> None:
        user, self._login_user = self._login_user, b""
        try:
            self._check_password(user.decode("utf-8"), blob.decode("utf-8"))
        except UnicodeDecodeError:
            self._reply("501 5.5.2 Malformed LOGIN response")

    def _check_password(self, user: str, password: str) -> None:
        intake = self._listener.intake
        self._start(self._authenticate(intake, self._info(), user, password), ours=True)

    async def _authenticate(
        self, intake: Intake, info: SessionInfo, user: str, password: str
    ) -> None:
        try:
            # A worker thread: a slow password hash must not stall every other session.
            ok = await asyncio.to_thread(intake.authenticate, info, user, password)
        except Exception as exc:
            if not self._task_done():
                return
            self._log_refusal("AUTH", exc)
            self._reply(to_reply(exc))
        else:
            if not self._task_done():
                return
            if ok:
                self._auth_user = user
                self._info_cache = None
                self._log.info("%s:%d authenticated as %r", self._peer_ip, self._peer_port, user)
                self._reply("235 2.7.0 Authentication successful")
            else:
                # Never log the password or the AUTH arguments; the user name is fine.
                self._log.info("%s:%d AUTH failed for %r", self._peer_ip, self._peer_port, user)
                self._reply("535 5.7.8 Authentication credentials invalid")
        self._resume()

    # ---- the mail transaction ------------------------------------------------------------

    def _ask(self, stage: str, check: Any, *args: Any) -> str | None:
        """Run one synchronous intake check; the reply if it refused (or crashed)."""
        try:
            check(self._info(), *args)
        except Exception as exc:
            self._log_refusal(stage, exc)
            return to_reply(exc)
        return None

    def smtp_MAIL(self, arg: str | None) -> None:
        if self._helo_missing():
            return
        if self._settings.require_auth and self._auth_user is None:
            self._reply("530 5.7.0 Authentication required")
            return
        if self._txn_intake is not None:
            self._reply("503 5.5.1 Error: nested MAIL command")
            return
        if self._draining:
            self.goodbye(R_SHUTDOWN)
            return
        rest = strip_keyword("FROM:", arg)
        if rest is None:
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            path, param_text = split_path(rest)
            if param_text and not self._extended:
                raise AddressSyntaxError("ESMTP parameters need EHLO, not HELO")  # RFC 5321 § 4.1.1.11
            params = parse_params(param_text)
            ret, envid = mail_dsn(params)
            smtputf8, body_8bit = mail_params(params, self._settings.max_message_size)
            sender = parse_mailbox(path, smtputf8=smtputf8) if path else ""  # <> is null
        except RelayError as exc:
            self._reply(to_reply(exc))
            return
        intake = self._listener.intake  # this transaction's intake, whatever reload brings
        refusal = self._ask("MAIL", intake.check_sender, sender)
        if refusal is not None:
            self._reply(refusal)
            return
        self._txn_intake = intake
        self._body_8bit = body_8bit
        self._mail_from = sender
        self._smtputf8 = smtputf8
        self._ret, self._envid = ret, envid
        self._reply("250 2.1.0 Sender OK")

    def smtp_RCPT(self, arg: str | None) -> None:
        if self._helo_missing():
            return
        intake = self._txn_intake
        if intake is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        rest = strip_keyword("TO:", arg)
        if rest is None:
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        try:
            path, param_text = split_path(rest)
            if param_text and not self._extended:
                raise AddressSyntaxError("ESMTP parameters need EHLO, not HELO")
            params = parse_params(param_text)
            dsn = rcpt_dsn(params)
            if params:
                raise PermanentError("RCPT parameters not recognized", code=555, enhanced="5.5.4")
            if path.lower() == "postmaster":
                # RFC 5321 § 4.5.1: <Postmaster> without a domain must be accepted; it is the
                # relay's own postmaster, a configured address.
                path = self._settings.postmaster
            rcpt = parse_mailbox(path, smtputf8=self._smtputf8)
        except RelayError as exc:
            self._reply(to_reply(exc))
            return
        if len(self._rcpts) >= self._settings.max_recipients:
            self._reply("452 4.5.3 Too many recipients")  # RFC 5321 § 4.5.3.1.10
            return
        refusal = self._ask("RCPT", intake.check_recipient, self._mail_from, rcpt)
        if refusal is not None:
            self._reply(refusal)
            return
        self._rcpts.append(rcpt)
        if dsn is not None:
            self._rcpt_dsn.append((rcpt, dsn))
        self._reply("250 2.1.5 Recipient OK")

    def smtp_DATA(self, arg: str | None) -> None:
        if self._helo_missing():
            return
        if self._txn_intake is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        if not self._rcpts:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        self._reply("354 End data with <CR><LF>.<CR><LF>")
        if self._closing:
            return
        self._state = _DATA
        self._scan = 0
        self._data_problem = None
        # The DATA line's own CRLF starts the body buffer: then <CRLF>.<CRLF> ends the data
        # even right away, and unstuffing is one replace of CRLF "." by CRLF.
        self._buf[0:0] = b"\r\n"

    def _data_step(self) -> bool:
        """DATA: True once the end marker was handled, False to wait for more bytes."""
        buf = self._buf
        end = self._find_end(buf)
        if end < 0:
            s = self._settings
            if len(buf) > s.max_message_size + 8:
                # Too big whatever comes next: decide the reply now, then keep only enough
                # to find the end marker, storing nothing else (bounded memory).
                if self._data_problem is None:
                    last = buf.rfind(b"\r\n") + 2  # whole lines only
                    self._data_problem = body_problem(
                        buf[:last], s.max_line_length, s.max_message_size
                    ) or (R_LINE_TOO_LONG if len(buf) - last > s.max_line_length else R_TOO_BIG)
                del buf[:-4]
                self._scan = 0
            return False
        rest = buf[end + 5 :]
        del buf[end + 2 :]  # the body (with the leading CRLF) up to its last line's CRLF
        self._buf = rest
        self._state = _COMMAND
        self._end_of_data(buf)
        return True

    def _find_end(self, buf: bytearray) -> int:
        """Where the end marker starts, or -1 (then `_scan` says where to go on: a marker
        may straddle the next segment). The first CRLF "." CRLF is the end: a stuffed line
        is never one."""
        hit = buf.find(_END_OF_DATA, self._scan)
        if hit < 0:
            self._scan = max(len(buf) - 4, self._scan)
        return hit

    def _end_of_data(self, stuffed: bytearray) -> None:
        """`stuffed`: CRLF + the body as sent, through its last CRLF (or just the last
        bytes of a body already refused)."""
        s = self._settings
        problem = self._data_problem
        dotted = False
        if problem is None:
            problem, dotted = examine(stuffed, s.max_line_length, s.max_message_size)
        if problem is not None:
            self._log.info("%s:%d DATA refused: %s", self._peer_ip, self._peer_port, problem)
            self._set_rset_state()
            self._reply(problem)
            return
        # RFC 5321 § 4.5.2: a line starting with "." was sent with another one. Most bodies
        # have none: then the bytes as sent are the message and the wire form at once (one
        # copy, below, from the receive buffer to the message with our Received: field).
        content = stuffed.replace(b"\r\n.", b"\r\n") if dotted else stuffed
        intake = self._txn_intake
        assert intake is not None
        info = self._info()
        with memoryview(content) as view:
            data = b"".join((self._received_header(), view[2:]))
        envelope = Envelope(
            sender=self._mail_from,
            recipients=tuple(self._rcpts),
            data=data,
            client_ip=self._peer_ip,
            client_user=info.user,
            helo=info.helo,
            smtputf8=self._smtputf8,
            # Declared, or 8-bit octets sent anyway: delivery then asks the upstream for
            # 8BITMIME instead of passing undeclared 8-bit data on.
            body_8bit=self._body_8bit or not content.isascii(),
            dsn=self._dsn(),
            wire=not dotted,
        )
        self._start(self._submit(intake, info, envelope), ours=True)

    def _dsn(self) -> DsnParams | None:
        if self._ret is None and self._envid is None and not self._rcpt_dsn:
            return None
        return DsnParams(self._ret, self._envid, tuple(self._rcpt_dsn))

    async def _submit(self, intake: Intake, info: SessionInfo, envelope: Envelope) -> None:
        try:
            # Nothing cancels this task: a session timeout or a lost client must not cut a
            # spool write half-way (the client then gets no 250 and retries: a duplicate
            # rather than a loss).
            queue_id = await intake.submit(info, envelope)
            if not isinstance(queue_id, str) or not queue_id.isprintable() or not queue_id:
                raise TypeError(f"Intake.submit returned {queue_id!r}, not a queue id")
        except Exception as exc:
            if not self._task_done():
                return
            self._log_refusal("DATA", exc)
            reply = to_reply(exc)
        else:
            if not self._task_done():
                return
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
        self._set_rset_state()  # the transaction ends before its final reply goes out
        self._reply(reply)
        self._resume()

    def _received_header(self) -> bytes:
        return received_header(
            helo=self._helo,
            peer_ip=self._peer_ip,
            hostname=self._settings.hostname,
            extended=self._extended,
            smtputf8=self._smtputf8,
            tls=self._tls,
            authenticated=self._auth_user is not None,
        )


_HANDLERS: dict[str, Callable[[SmtpSession, str | None], None]] = {
    "HELO": SmtpSession.smtp_HELO,
    "EHLO": SmtpSession.smtp_EHLO,
    "MAIL": SmtpSession.smtp_MAIL,
    "RCPT": SmtpSession.smtp_RCPT,
    "DATA": SmtpSession.smtp_DATA,
    "RSET": SmtpSession.smtp_RSET,
    "NOOP": SmtpSession.smtp_NOOP,
    "QUIT": SmtpSession.smtp_QUIT,
    "VRFY": SmtpSession.smtp_VRFY,
    "EXPN": SmtpSession.smtp_EXPN,
    "HELP": SmtpSession.smtp_HELP,
    "STARTTLS": SmtpSession.smtp_STARTTLS,
    "AUTH": SmtpSession.smtp_AUTH,
}


def _within(ip: str, networks: tuple[str, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)  # uvloop's are no asyncio.WriteTransport
    if abort is not None:
        abort()  # a no-op once the connection is gone
    # Some transports ignore abort() in the middle of a TLS shutdown (uvloop's); shutting
    # the socket down ends the session in any case: the read side sees EOF and the
    # protocol's connection_lost follows.
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
