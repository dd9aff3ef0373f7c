"""Scripted SMTP dialogs against a real Listener on 127.0.0.1 (port 0), real TLS (trustme).

Each test reads like the RFC: a line sent, the exact reply code and enhanced code expected.
The Intake behind the listener is a small in-memory fake (the spool is another stage);
its password check uses the real relay.auth hashes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.core.errors import AccessDenied, PermanentError, RateLimited, RelayError, SpoolError
from relay.core.model import Envelope, TlsMode
from relay.smtp.server import Listener, ListenerSettings, SessionInfo
from relay.smtp.users import Users, hash_password

REPLY_TIMEOUT = 5.0
ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
PASSWORD = "correct horse battery staple"


# ---- the fake intake ---------------------------------------------------------------------


class FakeIntake:
    """Allowlist by IP, users from relay.auth, submissions kept in memory."""

    def __init__(self, *, allow: tuple[str, ...] = ("127.0.0.1",), name: str = "Q") -> None:
        self.allow = set(allow)
        self.name = name
        self.users = Users({"alice": hash_password(PASSWORD, n=2**10)})
        self.submitted: list[tuple[SessionInfo, Envelope]] = []
        self.senders: list[str] = []
        self.refuse_connect: Exception | None = None
        self.sender_error: Exception | None = None
        self.submit_error: BaseException | None = None
        self.hold: asyncio.Event | None = None
        self.in_submit = asyncio.Event()

    def check_connect(self, peer_ip: str) -> None:
        if self.refuse_connect is not None:
            raise self.refuse_connect

    def authenticate(self, session: SessionInfo, user: str, password: str) -> bool:
        return self.users.verify(user, password)

    def check_sender(self, session: SessionInfo, sender: str) -> None:
        self.senders.append(sender)
        if self.sender_error is not None:
            raise self.sender_error
        if session.user is None and session.peer_ip not in self.allow:
            raise AccessDenied()

    def check_recipient(self, session: SessionInfo, sender: str, rcpt: str) -> None:
        if rcpt.endswith("@refused.example"):
            raise PermanentError("No such user here", code=550, enhanced="5.1.1")

    async def submit(self, session: SessionInfo, envelope: Envelope) -> str:
        self.in_submit.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.submit_error is not None:
            raise self.submit_error
        self.submitted.append((session, envelope))
        return f"{self.name}{len(self.submitted)}"


# ---- the client side ---------------------------------------------------------------------


class Client:
    """A raw SMTP client: send lines, read whole replies, check codes.

    Every reply must carry an RFC 3463 enhanced code except the greeting, EHLO/HELO
    replies and the 334/354 intermediates (RFC 2034 § 3): checked on every read."""

    opened: list[Client] = []  # closed by the close_clients fixture

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.last_verb = "<greeting>"
        Client.opened.append(self)

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        source: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        greeting: str | None = "220 relay.test ESMTP",
    ) -> Client:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            local_addr=(source, 0),
            ssl=tls,
            server_hostname="localhost" if tls else None,
        )
        client = cls(reader, writer)
        if greeting is not None:
            await client.expect(greeting)
        return client

    async def send(self, data: str | bytes) -> None:
        raw = data if isinstance(data, bytes) else data.encode("utf-8") + b"\r\n"
        self.last_verb = raw.split(b" ", 1)[0].split(b"\r", 1)[0].decode("ascii", "replace")
        self.writer.write(raw)
        await self.writer.drain()

    async def reply(self) -> list[str]:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            assert raw.endswith(b"\r\n"), f"connection closed or bad line: {raw!r} after {lines}"
            line = raw[:-2].decode("utf-8")
            lines.append(line)
            if len(line) == 3 or line[3] == " ":
                break
        code = lines[-1][:3]
        plain_ok = self.last_verb.upper() in ("<GREETING>", "EHLO", "HELO") or code in (
            "334",
            "354",
        )
        if not plain_ok:
            for line in lines:
                assert ENHANCED.match(line), f"reply without enhanced code: {line!r}"
        return lines

    async def expect(self, prefix: str) -> list[str]:
        lines = await self.reply()
        assert lines[-1].startswith(prefix), f"expected {prefix!r}, got {lines}"
        return lines

    async def cmd(self, line: str | bytes, prefix: str) -> list[str]:
        await self.send(line)
        return await self.expect(prefix)

    async def ehlo(self, name: str = "client.example") -> list[str]:
        lines = await self.cmd(f"EHLO {name}", "250 ")
        return [line[4:] for line in lines[1:]]

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        await self.cmd("STARTTLS", "220 2.0.0")
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def auth_plain(self, user: str, password: str, prefix: str) -> list[str]:
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}", prefix)

    async def closed(self) -> None:
        """The server closed the connection (EOF, or a reset after close)."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), REPLY_TIMEOUT)
        except ConnectionResetError:
            return
        assert rest == b"", f"unexpected bytes before close: {rest!r}"

    async def send_message(self, body: bytes, *, sender: str = "app@example.com") -> list[str]:
        await self.cmd(f"MAIL FROM:<{sender}>", "250 2.1.0")
        await self.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
        await self.cmd("DATA", "354 ")
        await self.send(body + b".\r\n")
        return await self.reply()


BODY = b"From: app@example.com\r\nTo: user@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
RECEIVED = re.compile(
    rb"^Received: from client\.example \(\[127\.0\.0\.[12]\]\)\r\n"
    rb"\tby relay\.test \(egress-relay\) with (?P<proto>[A-Z0-9]+);\r\n"
    rb"\t[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}\r\n"
)


def message_body(envelope: Envelope) -> tuple[str, bytes]:
    """(with-protocol of our Received header, the client's bytes after it)."""
    m = RECEIVED.match(envelope.data)
    assert m, envelope.data[:300]
    return m["proto"].decode(), envelope.data[m.end() :]


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    for client in Client.opened:
        client.writer.close()
    Client.opened.clear()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    return str(cert_file), str(key_file)


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


MakeListener = Callable[..., Awaitable[tuple[Listener, FakeIntake]]]


@pytest.fixture
async def make_listener(cert_files: tuple[str, str]) -> AsyncIterator[MakeListener]:
    started: list[Listener] = []

    async def make(
        intake: FakeIntake | None = None, **overrides: Any
    ) -> tuple[Listener, FakeIntake]:
        settings = ListenerSettings(
            name="test",
            address="127.0.0.1",
            port=0,
            tls=TlsMode.STARTTLS,
            cert_file=cert_files[0],
            key_file=cert_files[1],
            hostname="relay.test",
        )
        settings = replace(settings, **overrides)
        intake = intake or FakeIntake()
        listener = Listener(settings, intake)
        await listener.start()
        started.append(listener)
        return listener, intake

    yield make
    for listener in started:
        await listener.stop(grace=0)


# ---- a message, start to finish ----------------------------------------------------------


async def test_allowlisted_client_sends_a_message(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    extensions = await c.ehlo()
    assert extensions == [
        "PIPELINING",
        "SIZE 36700160",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
        "STARTTLS",
    ]  # no AUTH before TLS (RFC 4954 § 4)
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd('RCPT TO:<"john doe"@example.net>', "250 2.1.5")  # quoted local part
    await c.cmd("DATA", "354 ")
    # "..dots" is a dot-stuffed line (RFC 5321 § 4.5.2): the spool gets ".dots".
    await c.send(BODY + b"..dots\r\n.\r\n")
    reply = await c.expect("250 2.0.0")
    assert "Q1" in reply[-1]
    await c.cmd("QUIT", "221 2.0.0")
    await c.closed()

    [(session, envelope)] = intake.submitted
    assert session == SessionInfo("127.0.0.1", session.peer_port, "client.example", False, None,
                                  listener="test")
    assert envelope.sender == "app@example.com"
    assert envelope.recipients == ("user@example.org", '"john doe"@example.net')
    proto, body = message_body(envelope)
    assert proto == "ESMTP"
    assert body == BODY + b".dots\r\n"
    assert (envelope.client_ip, envelope.client_user, envelope.helo) == (
        "127.0.0.1",
        None,
        "client.example",
    )
    assert (envelope.smtputf8, envelope.body_8bit) == (False, False)


async def test_pipelined_transaction_replies_in_order(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    # RFC 2920: MAIL, RCPTs and DATA in one write; replies come back in order.
    await c.send(
        b"MAIL FROM:<>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@refused.example>\r\n"
        b"RCPT TO:<c@example.org>\r\nDATA\r\n"
    )
    c.last_verb = "MAIL"
    await c.expect("250 2.1.0")
    await c.expect("250 2.1.5")
    await c.expect("550 5.1.1 No such user here")
    await c.expect("250 2.1.5")
    await c.expect("354 ")
    await c.send(BODY + b".\r\nQUIT\r\n")
    await c.expect("250 2.0.0 OK: queued as Q1")
    await c.expect("221 2.0.0")
    [(_, envelope)] = intake.submitted
    assert envelope.sender == ""  # the null reverse-path
    assert envelope.recipients == ("a@example.org", "c@example.org")


async def test_smtputf8_and_8bitmime_pass_through(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<用户@例子.广告> SMTPUTF8 BODY=8BITMIME", "250 2.1.0")
    await c.cmd("RCPT TO:<josé@exämple.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    body = "Subject: ça va\r\n\r\nnaïve\r\n".encode()
    await c.send(body + b".\r\n")
    await c.expect("250 2.0.0")
    [(_, envelope)] = intake.submitted
    assert (envelope.sender, envelope.recipients) == ("用户@例子.广告", ("josé@exämple.org",))
    assert (envelope.smtputf8, envelope.body_8bit) == (True, True)
    assert message_body(envelope) == ("UTF8SMTP", body)


async def test_undeclared_8bit_is_flagged_and_non_ascii_address_needs_smtputf8(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    # RFC 6531 § 3.5: a non-ASCII address without SMTPUTF8 is refused with 553 5.6.7.
    await c.cmd("MAIL FROM:<josé@example.com>", "553 5.6.7")
    reply = await c.send_message(b"Subject: x\r\n\r\n\xe9t\xe9\r\n")
    assert reply[-1].startswith("250 2.0.0")
    [(_, envelope)] = intake.submitted
    assert (envelope.smtputf8, envelope.body_8bit) == (False, True)


# ---- who may send ------------------------------------------------------------------------


async def test_unlisted_client_is_refused_at_mail(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port, source="127.0.0.2")
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "554 5.7.1 Relay access denied")
    await c.cmd("RCPT TO:<user@example.org>", "503 5.5.1")
    await c.cmd("DATA", "503 5.5.1")
    assert intake.senders == ["app@example.com"]
    assert intake.submitted == []


async def test_connect_check_refusal_replaces_the_greeting(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    intake.refuse_connect = RateLimited("Too many connections from your network")
    c = await Client.connect(listener.port, greeting="421 4.7.1 Too many connections")
    await c.closed()
    intake.refuse_connect = AccessDenied()
    c = await Client.connect(listener.port, greeting="554 5.7.1 Relay access denied")
    await c.closed()


async def test_auth_is_refused_on_a_plain_listener(make_listener: MakeListener) -> None:
    listener, _ = await make_listener(tls=TlsMode.NONE, cert_file=None, key_file=None)
    c = await Client.connect(listener.port)
    extensions = await c.ehlo()
    assert not any(e.startswith(("AUTH", "STARTTLS")) for e in extensions)
    await c.auth_plain("alice", PASSWORD, "538 5.7.11 Encryption required")
    await c.cmd("STARTTLS", "502 5.5.1")


async def test_auth_plain_over_starttls(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port, source="127.0.0.2")  # not allowlisted
    await c.ehlo()
    await c.auth_plain("alice", PASSWORD, "538 5.7.11")
    await c.starttls(client_tls)
    extensions = await c.ehlo()
    assert "AUTH PLAIN LOGIN" in extensions
    assert "STARTTLS" not in extensions
    await c.cmd("STARTTLS", "503 5.5.1")
    await c.auth_plain("alice", PASSWORD, "235 2.7.0")
    await c.auth_plain("alice", PASSWORD, "503 5.5.1 Already authenticated")
    await c.send_message(BODY)
    [(session, envelope)] = intake.submitted
    assert session.user == envelope.client_user == "alice"
    assert session.tls is True
    assert message_body(envelope) == ("ESMTPSA", BODY)


async def test_auth_login_with_challenges(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port, source="127.0.0.2")
    await c.ehlo()
    await c.starttls(client_tls)
    await c.ehlo()
    b64 = base64.b64encode
    await c.cmd("AUTH LOGIN", "334 " + b64(b"Username:").decode())
    await c.cmd(b64(b"alice").decode(), "334 " + b64(b"Password:").decode())
    await c.cmd(b64(PASSWORD.encode()).decode(), "235 2.7.0")
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    assert intake.senders == ["app@example.com"]


async def test_auth_failures_are_counted_then_disconnect(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, _ = await make_listener()
    c = await Client.connect(listener.port, source="127.0.0.2")
    await c.ehlo()
    await c.starttls(client_tls)
    await c.ehlo()
    await c.auth_plain("alice", "wrong", "535 5.7.8")
    await c.auth_plain("mallory", PASSWORD, "535 5.7.8")  # unknown user: same answer
    await c.auth_plain("alice", "wrong again", "535 5.7.8")
    await c.expect("421 4.7.0")
    await c.closed()


async def test_auth_arguments_and_passwords_are_never_logged(
    make_listener: MakeListener, client_tls: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    listener, _ = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.starttls(client_tls)
    await c.ehlo()
    secrets_sent = [PASSWORD, "hunter2"]
    await c.auth_plain("alice", "hunter2", "535 5.7.8")
    b64 = base64.b64encode
    await c.cmd("AUTH LOGIN " + b64(b"alice").decode(), "334 ")
    await c.cmd(b64(PASSWORD.encode()).decode(), "235 2.7.0")
    await c.cmd("QUIT", "221")
    await c.closed()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "authenticated as 'alice'" in logged  # the log is there, the secrets are not
    for secret in secrets_sent:
        assert secret not in logged
        assert b64(secret.encode()).decode() not in logged
        assert b64(f"\0alice\0{secret}".encode()).decode() not in logged


async def test_require_tls_refuses_mail_before_starttls(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener(require_tls=True)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "530 5.7.0")
    await c.starttls(client_tls)
    await c.ehlo()
    reply = await c.send_message(BODY)
    assert reply[-1].startswith("250 2.0.0")
    assert message_body(intake.submitted[0][1])[0] == "ESMTPS"


async def test_require_auth_applies_to_allowlisted_clients(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener(require_auth=True)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "530 5.7.0 Authentication required")
    await c.starttls(client_tls)
    await c.ehlo()
    await c.auth_plain("alice", PASSWORD, "235 2.7.0")
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    assert intake.senders == ["app@example.com"]


async def test_implicit_tls_listener(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener(tls=TlsMode.IMPLICIT)
    c = await Client.connect(listener.port, source="127.0.0.2", tls=client_tls)
    extensions = await c.ehlo()
    assert "AUTH PLAIN LOGIN" in extensions
    assert "STARTTLS" not in extensions
    await c.auth_plain("alice", PASSWORD, "235 2.7.0")
    await c.send_message(BODY)
    [(session, envelope)] = intake.submitted
    assert session.tls and envelope.client_user == "alice"
    assert message_body(envelope) == ("ESMTPSA", BODY)


async def test_set_intake_applies_to_new_transactions(make_listener: MakeListener) -> None:
    listener, old = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<a@example.com>", "250 2.1.0")
    new = FakeIntake(name="N")
    listener.set_intake(new)
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(BODY + b".\r\n")
    await c.expect("250 2.0.0 OK: queued as Q1")  # the transaction kept its intake
    await c.send_message(BODY)
    assert [len(old.submitted), len(new.submitted)] == [1, 1]


# ---- limits ------------------------------------------------------------------------------


async def test_declared_size_over_the_limit_is_refused_at_mail(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(max_message_size=1000)
    c = await Client.connect(listener.port)
    assert "SIZE 1000" in await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com> SIZE=1001", "552 5.3.4")
    await c.cmd("MAIL FROM:<app@example.com> SIZE=1000", "250 2.1.0")
    assert intake.senders == ["app@example.com"]


async def test_message_growing_over_the_limit_is_refused_after_data(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener(max_message_size=1000)
    c = await Client.connect(listener.port)
    await c.ehlo()
    reply = await c.send_message(BODY + (b"y" * 98 + b"\r\n") * 10)  # > 1000 octets
    assert reply[-1].startswith("552 5.3.4")
    assert intake.submitted == []
    # The session goes on; the next transaction starts clean.
    reply = await c.send_message(BODY)
    assert reply[-1].startswith("250 2.0.0")
    assert len(intake.submitted) == 1


async def test_too_many_recipients(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(max_recipients=2)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<a@example.org>", "250 2.1.5")
    await c.cmd("RCPT TO:<b@example.org>", "250 2.1.5")
    await c.cmd("RCPT TO:<c@example.org>", "452 4.5.3")  # RFC 5321 § 4.5.3.1.10
    await c.cmd("DATA", "354 ")
    await c.send(BODY + b".\r\n")
    await c.expect("250 2.0.0")
    assert intake.submitted[0][1].recipients == ("a@example.org", "b@example.org")


async def test_over_long_command_line(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    # 512 octets (RFC 5321 § 4.5.3.1.4) plus what SIZE, SMTPUTF8, RET and ENVID may add.
    await c.cmd("MAIL FROM:<" + "a" * 700 + "@example.com>", "500 5.5.2")
    await c.cmd("NOOP " + "x" * 2000, "500 5.5.2")  # longer than the reader's buffer
    await c.cmd("NOOP", "250 2.0.0")
    assert intake.senders == []


async def test_over_long_text_line(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    ok_line = b"." + b"a" * 998 + b"\r\n"  # 1000 octets once the dot is unstuffed
    reply = await c.send_message(BODY + ok_line)
    assert reply[-1].startswith("250 2.0.0")
    for long_line in (b"a" * 999 + b"\r\n", b"b" * 5000 + b"\r\n"):
        reply = await c.send_message(BODY + long_line + b"more\r\n")
        assert reply[-1].startswith("500 5.5.2")
    assert [message_body(e)[1] for _, e in intake.submitted] == [BODY + ok_line[1:]]


async def test_idle_timeout(make_listener: MakeListener) -> None:
    listener, _ = await make_listener(idle_timeout=0.2)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.expect("421 4.4.2")
    await c.closed()


async def test_session_timeout(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(idle_timeout=30, session_timeout=0.3)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: slow\r\n")
    await c.expect("421 4.4.2")
    await c.closed()
    assert intake.submitted == []


async def test_too_many_errors_disconnects(make_listener: MakeListener) -> None:
    listener, _ = await make_listener(max_errors=3)
    c = await Client.connect(listener.port)
    await c.cmd("MAIL FROM:<a@example.com>", "503 5.5.1")  # no EHLO yet
    await c.ehlo()
    await c.cmd("MAIL TO:<a@example.com>", "501 5.5.4")
    await c.cmd("NOOP", "250 2.0.0")
    await c.cmd("RCPT TO:<a@example.com>", "503 5.5.1")
    await c.expect("421 4.7.0")
    await c.closed()


async def test_unknown_command_is_not_echoed(make_listener: MakeListener) -> None:
    listener, _ = await make_listener()
    c = await Client.connect(listener.port)
    lines = await c.cmd(b"FOO\rX-Injected: yes\r\n", "500 5.5.1")
    assert "Injected" not in lines[-1]
    await c.cmd("VRFY user@example.org", "252 2.5.0")
    await c.cmd("EXPN list", "502 5.5.1")
    await c.cmd("HELP", "214 2.0.0")
    await c.cmd("HELO", "501 5.5.4")
    await c.cmd("HELO client.example", "250 relay.test")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<@a.example,@b.example:user@c.example>", "553 5.1.3"),  # source route
        ("MAIL FROM:<user%c.example@b.example>", "553 5.1.3"),  # percent hack
        ("MAIL FROM:<c.example!user@b.example>", "553 5.1.3"),  # bang path
        ('MAIL FROM:<"a@c.example"@b.example>', "553 5.1.3"),
        ("MAIL FROM:<user@b.example", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> BODY=9BIT", "501 5.5.4"),
        ("MAIL FROM:<a@b.example> XVERP=1", "555 5.5.4"),
        (b"MAIL FROM:<us\x00er@b.example>\r\n", "501 5.5.4"),
        (b"MAIL FROM:<user@b.example>\rRCPT TO:<x@y.example>\r\n", "501 5.5.4"),
        (b"MAIL FROM:<us\rer@b.example>\r\n", "501 5.5.4"),
        ('MAIL FROM:<"quoted local"@b.example>', "250 2.1.0"),
        ("MAIL FROM:<a@[192.0.2.1]>", "250 2.1.0"),
        ("MAIL FROM: a@b.example AUTH=<>", "250 2.1.0"),  # lenient: no brackets, space
    ],
)
async def test_envelope_address_checks(
    make_listener: MakeListener, command: str | bytes, expected: str
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd(command, expected)
    assert len(intake.senders) == (1 if expected.startswith("250") else 0)
    if expected.startswith("250"):
        await c.cmd("RCPT TO:<@a.example:user@c.example>", "553 5.1.3")
        await c.cmd(b"RCPT TO:<user@c.example>\x00\r\n", "501 5.5.4")
        await c.cmd("RCPT TO:<>", "553 5.1.3")


# ---- failures in the intake fail closed --------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            SpoolError(reason="disk full at /var/spool"),
            "451 4.3.0 Queue write failed, try again later",
        ),
        (
            RuntimeError("secret internal detail"),
            "451 4.3.0 Temporary local problem, try again later",
        ),
    ],
)
async def test_submit_failure_answers_451(
    make_listener: MakeListener, error: Exception, expected: str
) -> None:
    listener, intake = await make_listener()
    intake.submit_error = error
    c = await Client.connect(listener.port)
    await c.ehlo()
    reply = await c.send_message(BODY)
    assert reply == [expected]
    intake.submit_error = None
    reply = await c.send_message(BODY)  # the session is still usable
    assert reply[-1].startswith("250 2.0.0")


async def test_policy_crash_answers_451(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    intake.sender_error = KeyError("org-42")
    c = await Client.connect(listener.port)
    await c.ehlo()
    lines = await c.cmd("MAIL FROM:<app@example.com>", "451 4.3.0")
    assert "org-42" not in lines[-1] and "KeyError" not in lines[-1]
    intake.sender_error = RelayError("Policy says later", code=451, enhanced="4.3.5")
    await c.cmd("MAIL FROM:<app@example.com>", "451 4.3.5 Policy says later")


# ---- graceful stop -----------------------------------------------------------------------


async def test_graceful_stop_finishes_the_transaction_in_progress(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    port = listener.port
    intake.hold = asyncio.Event()
    busy = await Client.connect(port)
    await busy.ehlo()
    idle = await Client.connect(listener.port)
    await idle.ehlo()
    await busy.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await busy.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await busy.cmd("DATA", "354 ")
    await busy.send(BODY + b".\r\n")
    await intake.in_submit.wait()

    stopping = asyncio.create_task(listener.stop(grace=10))
    await idle.expect("421 4.3.2")  # no transaction: told at once
    await idle.closed()
    with pytest.raises(OSError):  # no longer accepting
        await Client.connect(port)
    assert not stopping.done()

    intake.hold.set()  # the spool finishes: the client hears 250, then goodbye
    await busy.expect("250 2.0.0 OK: queued as Q1")
    await busy.expect("421 4.3.2")
    await busy.closed()
    await asyncio.wait_for(stopping, REPLY_TIMEOUT)
    assert len(intake.submitted) == 1


async def test_stop_closes_unfinished_transactions_after_grace(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: never finished\r\n")
    await asyncio.wait_for(listener.stop(grace=0.2), REPLY_TIMEOUT)
    await c.expect("421 4.3.2")
    await c.closed()
    assert intake.submitted == []


# ---- SMTP smuggling (2023) and STARTTLS command injection (CVE-2011-0411) ----------------

SMUGGLED = (
    b"MAIL FROM:<admin@example.com>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"From: admin@example.com\r\n\r\nsmuggled\r\n"
)
# Sequences some server has taken for <CRLF>.<CRLF>. Only the real one may end DATA.
FAKE_ENDINGS = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\r\n.\r",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
]


async def send_in_pieces(c: Client, pieces: list[bytes]) -> None:
    c.writer.transport.set_write_buffer_limits(0)
    for piece in pieces:
        await c.send(piece)
        await asyncio.sleep(0.005)  # pacing, so the server reads separate segments


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "split"])
@pytest.mark.parametrize("ending", FAKE_ENDINGS, ids=[repr(e)[2:-1] for e in FAKE_ENDINGS])
async def test_fake_end_of_data_never_yields_a_second_message(
    make_listener: MakeListener, ending: bytes, split: bool
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    head = b"Subject: hi\r\n\r\nhello"
    tail = SMUGGLED + b".\r\n"  # the genuine <CRLF>.<CRLF> comes last
    if split:
        await send_in_pieces(c, [head, *(bytes([b]) for b in ending), tail])
    else:
        await c.send(head + ending + tail)
    # One reply for the whole DATA: the message holds a bare CR or LF, so it is refused.
    await c.expect("554 5.6.0")
    await c.cmd("QUIT", "221 2.0.0")  # the very next reply: nothing was smuggled through
    await c.closed()
    assert intake.submitted == []
    assert intake.senders == ["app@example.com"]


async def test_genuine_end_of_data_then_pipelined_commands(make_listener: MakeListener) -> None:
    # The control case: after a real <CRLF>.<CRLF> the next bytes ARE commands (RFC 2920).
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: hi\r\n\r\nhello\r\n.\r\n" + SMUGGLED + b".\r\n")
    c.last_verb = "DATA"
    for prefix in ("250 2.0.0", "250 2.1.0", "250 2.1.5", "354 ", "250 2.0.0"):
        await c.expect(prefix)
    assert [e.sender for _, e in intake.submitted] == ["app@example.com", "admin@example.com"]


async def test_dot_lines_inside_the_body_do_not_end_it(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    body = b"Subject: dots\r\n\r\n...\r\n. \r\n.x\r\n..\r\n"
    reply = await c.send_message(body)
    assert reply[-1].startswith("250 2.0.0")
    [(_, envelope)] = intake.submitted
    assert message_body(envelope)[1] == b"Subject: dots\r\n\r\n..\r\n \r\nx\r\n.\r\n"


async def test_commands_pipelined_after_starttls_are_discarded(
    make_listener: MakeListener, client_tls: ssl.SSLContext
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    # RFC 3207 § 4.2: anything after STARTTLS in the same plaintext segment must not run
    # once TLS is up (CVE-2011-0411, "STARTTLS command injection").
    await c.send(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\nRCPT TO:<v@example.org>\r\n")
    c.last_verb = "STARTTLS"
    await c.expect("220 2.0.0")
    await c.writer.start_tls(client_tls, server_hostname="localhost")
    await c.ehlo()  # the first reply under TLS answers EHLO: no injected replies queued
    await c.cmd("RCPT TO:<v@example.org>", "503 5.5.1 Error: need MAIL command")
    assert intake.senders == []
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    assert intake.senders == ["app@example.com"]


async def test_error_count_resets_after_a_delivered_message(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(max_errors=2)
    c = await Client.connect(listener.port)
    await c.ehlo()
    for _ in range(3):  # a pooled connection: one bad recipient per message, for ever
        await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
        await c.cmd("RCPT TO:<gone@refused.example>", "550 5.1.1")
        await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
        await c.cmd("DATA", "354 ")
        await c.send(BODY + b".\r\n")
        await c.expect("250 2.0.0")
    assert len(intake.submitted) == 3


async def test_unrecognised_commands_end_the_session(make_listener: MakeListener) -> None:
    listener, _ = await make_listener()
    c = await Client.connect(listener.port)
    for _ in range(4):
        await c.cmd("XYZZY", "500 5.5.1")
    await c.cmd("XYZZY", "421 4.7.0")  # the fifth unknown command ends the session
    await c.closed()


async def test_failed_tls_handshake_closes_the_session(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("STARTTLS", "220 2.0.0")
    await c.send(b"MAIL FROM:<plaintext@example.com>\r\n" * 3)  # not a TLS ClientHello
    await c.closed()
    assert intake.senders == []
    await asyncio.wait_for(listener.stop(grace=1), REPLY_TIMEOUT)  # nothing left dangling


async def test_idle_timer_restarts_with_each_data_line(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(idle_timeout=0.5)
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: slow but steady\r\n\r\n")
    for i in range(8):  # 0.8 s of DATA in all, never 0.5 s without a line
        await asyncio.sleep(0.1)
        await c.send(f"line {i}".encode() + b"\r\n")
    await c.send(b".\r\n")
    await c.expect("250 2.0.0")
    assert len(intake.submitted) == 1


def test_starttls_auth_and_implicit_tls_under_uvloop(
    cert_files: tuple[str, str], client_tls: ssl.SSLContext
) -> None:
    # relay serve runs on uvloop; STARTTLS swaps protocols on the transport (loop.start_tls).
    import uvloop

    async def dialog() -> None:
        intake = FakeIntake(allow=())
        for tls in (TlsMode.STARTTLS, TlsMode.IMPLICIT):
            settings = ListenerSettings(
                "uv", "127.0.0.1", 0, tls, *cert_files, hostname="relay.test"
            )
            listener = Listener(settings, intake)
            await listener.start()
            try:
                if tls is TlsMode.STARTTLS:
                    c = await Client.connect(listener.port)
                    await c.ehlo()
                    await c.starttls(client_tls)
                else:
                    c = await Client.connect(listener.port, tls=client_tls)
                await c.ehlo()
                await c.auth_plain("alice", PASSWORD, "235 2.7.0")
                reply = await c.send_message(BODY)
                assert reply[-1].startswith("250 2.0.0")
                await c.cmd("QUIT", "221 2.0.0")
                c.writer.close()
            finally:
                await listener.stop(grace=1)
        assert [message_body(e) for _, e in intake.submitted] == [("ESMTPSA", BODY)] * 2

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(dialog(), 20))
    finally:
        loop.close()


# ---- the byte stream: pipelining, segmentation, backpressure, clients going away -------


async def test_pipelined_commands_are_answered_in_order_in_one_write(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.send(
        b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@refused.example>\r\nRCPT TO:<c@example.org>\r\nNOOP\r\nDATA\r\n"
    )
    # RFC 2920 § 3.1 (server side): every command already received is answered, in order,
    # and the replies go out together: one read gets them all.
    flight = await asyncio.wait_for(c.reader.read(65536), REPLY_TIMEOUT)
    assert flight.split(b"\r\n") == [
        b"250 2.1.0 Sender OK",
        b"250 2.1.5 Recipient OK",
        b"550 5.1.1 No such user here",
        b"250 2.1.5 Recipient OK",
        b"250 2.0.0 OK",
        b"354 End data with <CR><LF>.<CR><LF>",
        b"",
    ]
    await c.send(BODY + b".\r\n")
    c.last_verb = "DATA"
    await c.expect("250 2.0.0 OK: queued as Q1")
    assert intake.submitted[0][1].recipients == ("a@example.org", "c@example.org")


async def start_data(c: Client) -> None:
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")


async def test_data_one_byte_per_segment(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await start_data(c)
    body = b"Subject: drip\r\n\r\n..stuffed\r\n.\r\n"  # "." then "\r\n" ends it
    await send_in_pieces(c, [bytes([b]) for b in body])
    await c.expect("250 2.0.0")
    [(_, envelope)] = intake.submitted
    assert message_body(envelope)[1] == b"Subject: drip\r\n\r\n.stuffed\r\n"


@pytest.mark.parametrize("cut", [1, 2, 3, 4])
async def test_end_of_data_straddling_segments(make_listener: MakeListener, cut: int) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await start_data(c)
    end = b"\r\n.\r\n"
    await send_in_pieces(c, [BODY[:-2] + end[:cut], end[cut:] + b"NOOP\r\n"])
    await c.expect("250 2.0.0 OK: queued as Q1")
    await c.expect("250 2.0.0 OK")  # the NOOP after the marker is a command again
    [(_, envelope)] = intake.submitted
    assert message_body(envelope)[1] == BODY


async def test_empty_body_and_a_dot_stuffed_first_line(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await start_data(c)
    await c.send(b".\r\n")  # the DATA line's CRLF counts: an empty message
    await c.expect("250 2.0.0")
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"..first\r\n.\r\n")
    await c.expect("250 2.0.0")
    assert [message_body(e)[1] for _, e in intake.submitted] == [b"", b".first\r\n"]


async def test_oversized_body_is_read_to_its_end_and_refused(make_listener: MakeListener) -> None:
    listener, intake = await make_listener(max_message_size=1000)
    c = await Client.connect(listener.port)
    await start_data(c)
    [session] = listener._sessions
    lines = b"".join(b"line %05d of a long message\r\n" % i for i in range(20_000))
    await c.send(lines)  # 600 kB, no end yet
    # Once the relay has read it all, it holds only the last few bytes (to find the end).
    async with asyncio.timeout(REPLY_TIMEOUT):
        while session._data_problem is None or len(session._buf) > 8:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await send_in_pieces(c, [b"X-Fake: \r\n.\rsmuggled\r\n", b"\r\n.", b"\r\nQUIT\r\n"])
    await c.expect("552 5.3.4")
    await c.expect("221 2.0.0")
    assert intake.submitted == []


async def test_a_client_that_never_reads_replies_is_throttled(make_listener: MakeListener) -> None:
    listener, _ = await make_listener()
    c = await Client.connect(listener.port)
    await c.ehlo()
    [session] = listener._sessions
    server = session._transport
    assert server is not None
    # Small socket buffers on both ends, so that the flood backs up quickly.
    for sock in (c.writer.get_extra_info("socket"), server.get_extra_info("socket")):
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 65536)
    chunk = b"NOOP\r\n" * 1000
    sent = 0
    # Flood without reading until the relay stops reading from us and our own sending
    # backs up.
    while session._reading or not c.writer.transport.get_write_buffer_size():
        c.writer.write(chunk)
        sent += 1000
        await asyncio.sleep(0.002)
        assert sent < 1_000_000, "the relay never stopped reading"
    # What the relay holds for us is bounded: a partial line in, about a read's worth out.
    assert len(session._buf) <= listener.settings.max_line_length
    assert server.get_write_buffer_size() < 1024 * 1024
    # Nothing is lost: read everything, one reply per NOOP, in order.
    expected = b"250 2.0.0 OK\r\n" * sent
    got = await asyncio.wait_for(c.reader.readexactly(len(expected)), REPLY_TIMEOUT)
    assert got == expected
    await c.cmd("QUIT", "221 2.0.0")


async def wait_closed(listener: Listener) -> None:
    await asyncio.wait_for(listener._no_sessions.wait(), REPLY_TIMEOUT)


async def test_a_client_gone_mid_data_loses_nothing_acknowledged(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    await start_data(c)
    await c.send(BODY + b".\r\n")
    await c.expect("250 2.0.0 OK: queued as Q1")
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd("RCPT TO:<user@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: half\r\n\r\nonly half of it")
    c.writer.close()
    await wait_closed(listener)
    [(_, envelope)] = intake.submitted  # the acknowledged one, whole; not the half one
    assert message_body(envelope)[1] == BODY


async def test_a_half_closed_client_still_gets_its_replies(make_listener: MakeListener) -> None:
    listener, intake = await make_listener()
    intake.hold = asyncio.Event()
    c = await Client.connect(listener.port)
    await start_data(c)
    await c.send(BODY + b".\r\nQUIT\r\n")
    c.writer.write_eof()  # done sending; still reading
    await intake.in_submit.wait()
    intake.hold.set()
    c.last_verb = "DATA"
    await c.expect("250 2.0.0 OK: queued as Q1")
    await c.expect("221 2.0.0")
    await c.closed()
    await wait_closed(listener)
    assert len(intake.submitted) == 1
