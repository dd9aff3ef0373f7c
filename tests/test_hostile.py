"""Hostile clients end to end through `relay serve` (issue 7, part 2): slow and idle
connections, TLS downgrade attempts, command injection after STARTTLS, and hostile envelopes.
The dialog-level variants live in test_listener.py; here the promise is about the whole
relay: the proper reply, the relay keeps serving others, and nothing unintended reaches an
upstream (a clean message afterwards is the synchronisation point)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import ThreadedSink


@pytest.fixture(scope="module")
def relay_ca() -> trustme.CA:
    return trustme.CA()


def _relay(
    tmp_path: Path, sink: ThreadedSink, ca: trustme.CA | None = None, **listener: Any
) -> RelayConfig:
    cdir = tmp_path / "relay"
    cdir.mkdir(exist_ok=True)
    lst: dict[str, Any] = {"name": "smtp", "address": "127.0.0.1", "port": 0, **listener}
    if ca is not None:
        cert = ca.issue_cert("relay.test", "127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(cdir / "cert.pem"))
        cert.private_key_pem.write_to_path(str(cdir / "key.pem"))
        lst.update(cert_file="cert.pem", key_file="key.pem")
    return RelayConfig(
        cdir,
        upstreams={
            "plain": plain_upstream(sink.port)
        },
        default_upstream="plain",
        listeners=[lst],
    )


class Raw:
    """A raw line-oriented SMTP client: exactly the bytes we choose, nothing smtplib adds."""

    opened: list[Raw] = []

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        Raw.opened.append(self)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + " | ".join(lines))
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def cmd(self, line: bytes | str) -> str:
        self.sock.sendall(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def clients() -> Iterator[None]:
    """Close every raw client before the relay stops (an open transaction would make the
    relay's graceful stop wait for it)."""
    try:
        yield
    finally:
        for c in Raw.opened:
            c.close()
        Raw.opened.clear()


@pytest.fixture
def sink() -> Iterator[ThreadedSink]:
    with ThreadedSink() as s:
        yield s


def test_slow_and_idle_clients_are_cut_off_while_others_are_served(
    tmp_path: Path, sink: ThreadedSink
) -> None:
    cfg = _relay(tmp_path, sink, idle_timeout="1s", session_timeout="2.5s").write()
    with RelayProcess(cfg) as relay, clients():
        idle = Raw(relay.port)
        # Slowloris in DATA: complete short lines, each well within the idle timer, byte by
        # byte; only the session timer can end it.
        slow = Raw(relay.port)
        slow.cmd("EHLO slow.test")
        assert slow.cmd("MAIL FROM:<slow@x.test>").startswith("250")
        assert slow.cmd("RCPT TO:<slow@y.test>").startswith("250")
        assert slow.cmd("DATA").startswith("354")
        started = time.monotonic()
        cut: list[str] = []

        def drip() -> None:
            try:
                for _ in range(200):
                    for byte in b"ab\r\n":
                        slow.sock.sendall(bytes([byte]))
                        time.sleep(0.05)
            except OSError:
                pass
            try:
                cut.append(slow.reply())
            except (OSError, ConnectionError) as exc:
                cut.append(repr(exc))

        dripper = threading.Thread(target=drip)
        dripper.start()
        # Meanwhile the relay serves everyone else.
        for i in range(3):
            send(relay.port, "app@x.test", [f"busy{i}@y.test"])
        assert idle.reply().startswith("421 4.4.2")  # idle: cut after its idle timeout
        assert idle.closed()
        dripper.join(15)
        elapsed = time.monotonic() - started
        assert cut and cut[0].startswith("421 4.4.2"), cut
        assert 1.5 < elapsed < 8, elapsed
        send(relay.port, "app@x.test", ["after@y.test"])
        sink.wait_for(4, 15)
        relay.wait_events("delivered", 4)
    assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
        "after@y.test",
        "busy0@y.test",
        "busy1@y.test",
        "busy2@y.test",
    ]


def test_require_tls_listener_refuses_plaintext_mail_and_discards_injected_commands(
    tmp_path: Path, sink: ThreadedSink, relay_ca: trustme.CA
) -> None:
    cfg = _relay(tmp_path, sink, relay_ca, tls="starttls", require_tls=True).write()
    client_tls = ssl.create_default_context()
    relay_ca.configure_trust(client_tls)
    with RelayProcess(cfg) as relay, clients():
        c = Raw(relay.port)
        ehlo = c.cmd("EHLO app.test")
        assert "STARTTLS" in ehlo and "AUTH" not in ehlo
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("530 5.7.0")
        assert c.cmd("AUTH PLAIN AGFwcABwdw==").startswith("530 5.7.0")  # no AUTH in clear
        # STARTTLS injection (CVE-2011-0411): plaintext pipelined after STARTTLS is dropped.
        c.sock.sendall(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\n")
        assert c.reply().startswith("220")
        tls = client_tls.wrap_socket(c.sock, server_hostname="127.0.0.1")
        f = tls.makefile("rb")

        def cmd(line: str) -> str:
            tls.sendall(line.encode() + b"\r\n")
            out = []
            while True:
                raw = f.readline().decode()
                out.append(raw.rstrip())
                if raw[3:4] != "-":
                    return "\n".join(out)

        assert "AUTH" in cmd("EHLO app.test")
        assert cmd("DATA").startswith("503")  # the injected MAIL/RCPT never happened
        assert cmd("RCPT TO:<victim@y.test>").startswith("503")
        assert cmd("MAIL FROM:<a@x.test>").startswith("250")
        assert cmd("RCPT TO:<real@y.test>").startswith("250")
        assert cmd("DATA").startswith("354")
        assert cmd("Subject: over tls\r\n\r\nhi\r\n.").startswith("250")
        cmd("QUIT")
        f.close()
        tls.close()
        sink.wait_for(1, 15)
        relay.wait_events("delivered", 1)
    assert [m.rcpt_tos for m in sink.messages] == [["real@y.test"]]


HOSTILE_ENVELOPES: list[tuple[bytes, str]] = [
    (b"MAIL FROM:<@evil.test,@b.test:a@x.test>\r\n", "553 5.1.3"),  # source route
    (b"MAIL FROM:<a%victim.test@x.test>\r\n", "553 5.1.3"),  # % hack
    (b"MAIL FROM:<victim.test!a@x.test>\r\n", "553 5.1.3"),  # bang path
    (b'MAIL FROM:<"a@victim.test"@x.test>\r\n', "553 5.1.3"),  # quoted routing
    (b"MAIL FROM:<a\x00@x.test>\r\n", "501 5.5.4"),  # NUL
    (b"MAIL FROM:<a@x.test>\rRCPT TO:<victim@y.test>\r\n", "501 5.5.4"),  # bare CR
    (b"MAIL FROM:<a@x.test\nRCPT TO:<victim@y.test>>\r\n", "501 5.5.4"),  # bare LF
    (b"MAIL FROM:<a@x.test> SIZE=999999999999\r\n", "552 5.3.4"),  # over SIZE, declared
    (b"MAIL FROM:<" + b"a" * 700 + b"@x.test>\r\n", "500 5.5.2"),  # over-long command
    (b"AUTH PLAIN AGEAYg==\r\n", "538 5.7.11"),  # AUTH in clear
]
HOSTILE_RECIPIENTS: list[tuple[bytes, str]] = [
    (b"RCPT TO:<@evil.test:victim@y.test>\r\n", "553 5.1.3"),
    (b"RCPT TO:<victim%evil.test@y.test>\r\n", "553 5.1.3"),
    (b"RCPT TO:<evil.test!victim@y.test>\r\n", "553 5.1.3"),
    (b"RCPT TO:<vic\x00tim@y.test>\r\n", "501 5.5.4"),
    (b"RCPT TO:<>\r\n", "553 5.1.3"),
]


def test_hostile_envelopes_get_their_reply_and_reach_no_upstream(
    tmp_path: Path, sink: ThreadedSink
) -> None:
    cfg = _relay(tmp_path, sink, max_recipients=3, max_message_size="64k").write()
    with RelayProcess(cfg) as relay, clients():
        for line, expected in HOSTILE_ENVELOPES:
            c = Raw(relay.port)
            c.cmd("EHLO app.test")
            got = c.cmd(line)
            assert got.startswith(expected), (line, got)
            c.close()
        c = Raw(relay.port)
        c.cmd("EHLO app.test")
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
        for line, expected in HOSTILE_RECIPIENTS:
            got = c.cmd(line)
            assert got.startswith(expected), (line, got)
        # A bare CR inside a pipelined line: one bad command, never a DATA.
        assert c.cmd(b"RCPT TO:<x@y.test>\rDATA\r\n").startswith("501 5.5.4")
        assert c.cmd('RCPT TO:<"quoted local"@y.test>').startswith("250")  # valid RFC 5321
        assert c.cmd("RCPT TO:<two@y.test>").startswith("250")
        assert c.cmd("RCPT TO:<three@y.test>").startswith("250")
        assert c.cmd("RCPT TO:<four@y.test>").startswith("452 4.5.3")  # too many recipients
        assert c.cmd("DATA").startswith("354")
        # Over the size limit without a SIZE parameter: read to the end, then refused.
        big = b"".join(b"x" * 70 + b"\r\n" for _ in range(1200))
        assert c.cmd(b"Subject: big\r\n\r\n" + big + b".\r\n").startswith("552 5.3.4")
        # Over-long text line.
        assert c.cmd("MAIL FROM:<a@x.test>").startswith("250")
        assert c.cmd("RCPT TO:<long@y.test>").startswith("250")
        assert c.cmd("DATA").startswith("354")
        assert c.cmd(b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n.\r\n").startswith("500 5.5.2")
        c.close()
        send(relay.port, "a@x.test", ["clean@y.test"])
        sink.wait_for(1, 15)
        relay.wait_events("delivered", 1)
        time.sleep(0.3)  # nothing else may turn up after the synchronisation message
    assert [m.rcpt_tos for m in sink.messages] == [["clean@y.test"]]
    assert relay.events("received") and len(relay.events("received")) == 1


def test_a_tls_client_that_stops_reading_is_still_cut_off(
    tmp_path: Path, sink: ThreadedSink, relay_ca: trustme.CA
) -> None:
    # After STARTTLS, closing waits for the peer's TLS close_notify; a peer that never sends
    # one (and never closes) must not pin the session: the idle timeout's goodbye ends it.
    cfg = _relay(tmp_path, sink, relay_ca, tls="starttls", idle_timeout="1s").write()
    client_tls = ssl.create_default_context()
    relay_ca.configure_trust(client_tls)
    with RelayProcess(cfg) as relay, clients():
        c = Raw(relay.port)
        c.cmd("EHLO app.test")
        assert c.cmd("STARTTLS").startswith("220")
        tls = client_tls.wrap_socket(c.sock, server_hostname="127.0.0.1")
        tls.sendall(b"EHLO app.test\r\n")
        started = time.monotonic()
        raw = socket.socket(fileno=tls.fileno())  # read the bytes, never answer TLS
        raw.settimeout(15)
        try:
            while raw.recv(65536):
                pass
        except OSError:
            pass  # reset: also closed
        finally:
            raw.detach()
        elapsed = time.monotonic() - started
        assert elapsed < 9, elapsed  # idle timeout (1 s) + the close flush bound (5 s)
        relay.stop(timeout=10)  # and nothing holds the relay's shutdown


def test_a_connection_flood_from_one_client_is_capped_and_others_are_served(
    tmp_path: Path, sink: ThreadedSink
) -> None:
    cfg = _relay(tmp_path, sink)
    cfg.doc["limits"] = {"client": {"max_connections": 3}}
    cfg.doc["clients"] = {"networks": ["127.0.0.0/8"]}
    with RelayProcess(cfg.write()) as relay, clients():
        held = [Raw(relay.port) for _ in range(3)]
        assert all(c.greeting.startswith("220") for c in held)
        flood = []
        for _ in range(20):  # a flood beyond the cap: each refused at once, none pinned
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            f = sock.makefile("rb")
            flood.append(f.readline())
            assert f.read() == b""  # and closed
            f.close()
            sock.close()
        assert all(line.startswith(b"421 4.7.1") for line in flood), flood[:2]
        # Another client is served meanwhile; and the flooder again once one closed.
        send(relay.port, "a@x.test", ["other@y.test"], source="127.0.0.5")
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:
            c = Raw(relay.port)
            if c.greeting.startswith("220") or time.monotonic() > deadline:
                break
            c.close()  # the close of the held connection may not be counted yet
        assert c.greeting.startswith("220")
        assert c.cmd("EHLO app.test").startswith("250")
        sink.wait_for(1, 15)
        relay.wait_events("delivered", 1)
        rejected = relay.events("rejected")
    assert len(rejected) >= 20 and all(e["client"] == "127.0.0.1" for e in rejected)
    assert [m.rcpt_tos for m in sink.messages] == [["other@y.test"]]
