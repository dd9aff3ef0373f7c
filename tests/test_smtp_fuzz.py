"""Stateful fuzzing of our SMTP server's command and DATA state machine (issue 12).

A hypothesis `RuleBasedStateMachine` drives one `SmtpSession` over a real socket pair
(tests/smtpwire.py): random interleavings of commands (valid, invalid, hostile), pipelined
groups, the same bytes cut into random segments, DATA bodies with bare CR/LF, NUL, dot lines
and over-long lines, AUTH, STARTTLS with bytes injected after it, reconnects. After every
step:

- no exception escapes: nothing reaches the event loop's exception handler and the session
  never logs "unexpected error" (its fail-closed path for a bug);
- every byte the server sent is a well-formed SMTP reply line (`ddd`, `ddd text`,
  `ddd-text`, printable ASCII, CRLF);
- nothing is queued unless a whole transaction ended with 250: each queued envelope has a
  "250 ... queued as" reply, recipients the intake accepted, and a body without a bare CR,
  a bare LF or a NUL;
- memory per session stays bounded: the input buffer never holds more than one message's
  worth (the listener's limits are small here, so that the limit paths run too) and no
  reply is left unsent.

Bounded: a fixed number of examples and steps, no deadline-dependent sleeps (about 10 s).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import tempfile
from pathlib import Path

import trustme
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relay.smtp.session import SmtpSession
from tests.smtpwire import (
    PASSWORD,
    Owner,
    RecordingIntake,
    Wire,
    connect,
    our_session_busy,
    our_settings,
    server_tls_context,
)

MAX_MESSAGE = 4096
MAX_LINE = 200


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_CA = trustme.CA()
_CERT = _CA.issue_cert("localhost")
with tempfile.TemporaryDirectory(prefix="smtp-fuzz-") as _tmp:
    _CERT.cert_chain_pems[0].write_to_path(str(Path(_tmp) / "cert.pem"))
    _CERT.private_key_pem.write_to_path(str(Path(_tmp) / "key.pem"))
    SERVER_TLS = server_tls_context(str(Path(_tmp) / "cert.pem"), str(Path(_tmp) / "key.pem"))
CLIENT_TLS = ssl.create_default_context()
_CA.configure_trust(CLIENT_TLS)

ADDRESSES = st.sampled_from([
    "<a@x.test>", "<>", "<denied@x.test>", "<b@refused.test>", "<Postmaster>", "<@r.test:u@x.test>",
    "<u%v@x.test>", "<\"a b\"@x.test>", "<josé@x.test>", "a@x.test", "<a@x.test", "<a\x00@x.test>",
    "<" + "l" * 70 + "@x.test>", "<a@[127.0.0.1]>",
])
PARAMS = st.sampled_from([
    "", " SIZE=100", " SIZE=999999999", " BODY=8BITMIME", " SMTPUTF8", " RET=HDRS ENVID=e1",
    " NOTIFY=NEVER", " NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40x.test", " XFOO=1", " RET=BAD",
])
PLAIN = base64.b64encode(f"\0fuzz\0{PASSWORD}".encode()).decode()


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([
        "EHLO", "HELO", "MAIL", "RCPT", "RCPT", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "EXPN",
        "HELP", "AUTH", "STARTTLS", "garbage", "long", "empty", "lower",
    ]))
    if kind in ("EHLO", "HELO"):
        line = f"{kind} {draw(st.sampled_from(['client.test', '', 'a b', '[127.0.0.1]']))}"
    elif kind == "MAIL":
        line = f"MAIL FROM:{draw(ADDRESSES)}{draw(PARAMS)}"
    elif kind == "RCPT":
        line = f"RCPT TO:{draw(ADDRESSES)}{draw(PARAMS)}"
    elif kind == "AUTH":
        line = draw(st.sampled_from([f"AUTH PLAIN {PLAIN}", "AUTH PLAIN", "AUTH LOGIN", "AUTH X",
                                     "AUTH PLAIN !!!"]))
    elif kind == "garbage":
        line = draw(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=30))
    elif kind == "long":
        line = "NOOP " + "x" * draw(st.integers(500, 1200))
    elif kind == "empty":
        line = ""
    elif kind == "lower":
        line = "mail from:<a@x.test>"
    else:
        line = kind + draw(st.sampled_from(["", " arg"]))
    raw = line.encode("utf-8", "surrogateescape")
    return raw + draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"]))


BODY_LINES = st.sampled_from([
    b"Subject: fuzz", b"", b"text", b".", b"..", b".x", b"a\nb", b"a\rb", b"nul\x00",
    b"\xc3\xa9t\xc3\xa9", b"x" * 250, b"QUIT", b"MAIL FROM:<evil@x.test>",
])


class SmtpMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, object]] = []
        self.loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        self.errors = _Errors()
        logging.getLogger("relay.listener.wire").addHandler(self.errors)
        self.intake = RecordingIntake()
        self.owner = Owner(
            our_settings(max_message_size=MAX_MESSAGE, max_line_length=MAX_LINE,
                         max_command_length=300, max_errors=8),
            self.intake,
        )
        self.wires: list[Wire] = []
        self.queued = 0

    def run(self, coro: object) -> object:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]

    @property
    def wire(self) -> Wire:
        return self.wires[-1]

    @property
    def session(self) -> SmtpSession:
        return self.owner.sessions[-1]

    def _open(self) -> None:
        def factory() -> asyncio.Protocol:
            return SmtpSession(self.owner, SERVER_TLS, self.loop)

        self.wires.append(self.run(connect(self.loop, factory, our_session_busy)))  # type: ignore[arg-type]

    @initialize()
    def start(self) -> None:
        self._open()

    def _collect(self) -> None:
        for reply in self.wire.take():
            if reply[-1].startswith(b"250 2.0.0 OK: queued as"):
                self.queued += 1
                event("a message was queued")

    def _alive(self) -> None:
        """A session the server closed (QUIT, 421) is followed by a new connection."""
        if self.session._closing or self.wire.client.closed:
            self.wire.close()
            self._open()

    def _send(self, payload: bytes, cuts: list[int]) -> None:
        """`payload` in segments cut at `cuts`, the server settling after each."""
        self._alive()
        points = sorted({c % (len(payload) + 1) for c in cuts})
        pieces = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)], strict=True)]
        for piece in pieces:
            if piece:
                self.run(self.wire.send(piece))
        self._collect()

    @rule(cmds=st.lists(commands(), min_size=1, max_size=5), cuts=st.lists(st.integers(0, 400), max_size=3))
    def pipeline(self, cmds: list[bytes], cuts: list[int]) -> None:
        self._send(b"".join(cmds), cuts)

    @rule(lines=st.lists(BODY_LINES, max_size=6), cuts=st.lists(st.integers(0, 600), max_size=4),
          rcpts=st.lists(ADDRESSES, min_size=1, max_size=3))
    def transaction(self, lines: list[bytes], cuts: list[int], rcpts: list[str]) -> None:
        """A whole (mostly valid) transaction, pipelined, in random segments."""
        head = b"EHLO client.test\r\nMAIL FROM:<a@x.test>\r\n" + b"".join(
            f"RCPT TO:{r}\r\n".encode() for r in rcpts
        )
        self._send(head + b"DATA\r\n" + b"\r\n".join([b"Subject: t", *lines]) + b"\r\n.\r\n", cuts)

    @rule(lines=st.lists(BODY_LINES, max_size=8), big=st.booleans(),
          ending=st.sampled_from([b"\r\n.\r\n", b"\n.\n", b"\r\n.\r\nNOOP\r\n", b"\r.\r\n"]))
    def body(self, lines: list[bytes], big: bool, ending: bytes) -> None:
        text = b"\r\n".join(lines)
        if big:
            text += b"\r\n" + (b"y" * 70 + b"\r\n") * 80  # over MAX_MESSAGE
        self._send(text + ending, [])

    @rule(inject=st.sampled_from([b"", b"MAIL FROM:<injected@x.test>\r\n"]))
    def starttls(self, inject: bytes) -> None:
        self._alive()
        if self.session._tls or self.session._state != 0:  # TLS already, or inside DATA
            return
        self.run(self.wire.send(b"STARTTLS\r\n" + inject))
        replies = self.wire.take()
        for reply in replies:
            if reply[-1].startswith(b"250 2.0.0 OK: queued as"):
                self.queued += 1
        if replies and replies[-1][-1].startswith(b"220 "):
            assert self.run(self.wire.starttls(CLIENT_TLS)), "TLS handshake failed"
            assert self.session._tls
            assert "injected@x.test" not in {e.sender for e in self.intake.submitted}

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def no_exception_escapes(self) -> None:
        assert self.loop_errors == [], self.loop_errors
        assert self.errors.records == [], [r.getMessage() for r in self.errors.records]

    @invariant()
    def every_reply_is_well_formed(self) -> None:
        for wire in self.wires:
            assert wire.bad_lines == [], wire.bad_lines

    @invariant()
    def nothing_queued_without_its_250(self) -> None:
        self._collect()
        assert len(self.intake.submitted) == self.queued
        for env in self.intake.submitted:
            assert env.recipients and set(env.recipients) <= self.intake.accepted_rcpts
            data = env.data
            assert b"\x00" not in data
            assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")

    @invariant()
    def memory_stays_bounded(self) -> None:
        s = self.session
        assert len(s._buf) <= MAX_MESSAGE + MAX_LINE + 16
        assert s._out == [] or s._closing

    def teardown(self) -> None:
        for wire in self.wires:
            wire.close()
        self.run(asyncio.sleep(0))
        logging.getLogger("relay.listener.wire").removeHandler(self.errors)
        self.loop.close()


SmtpMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    derandomize=False,
)
test_smtp_state_machine = SmtpMachine.TestCase
