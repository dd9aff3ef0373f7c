"""Faults on the upstream side, end to end: the real `relay serve` delivering to servers that
refuse, stall at each step, hang up mid-DATA, answer garbage or oversized lines, present a
bad certificate, strip STARTTLS, or accept only some recipients (issue 7, part 3).

One relay serves every case at once: each case is an organisation whose upstream is one
misbehaving server, so the whole table costs one relay start and one timeout. Each case must
end as it should (deferred / bounced / delivered) with the upstream's own reply — or our
words for what happened — in the mail log, and nothing may be delivered where it must not.
Afterwards the relay is still healthy: a message to a good server is delivered.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.badserver import BadServer
from tests.certs import CertAuthority
from tests.relayproc import RelayConfig, RelayProcess, send
from tests.sinks import Script, ThreadedSink

# Small, bounded timeouts: each stall costs one of these.
TIMEOUTS = {"connect_timeout": "0.6s", "command_timeout": "0.6s", "data_timeout": "0.8s"}
SECRET = {"BAD_PW": "bad-server-pw"}


@dataclass
class Case:
    name: str
    outcome: str  # the mail-log event each recipient must end in (first attempt)
    reply: str  # a substring of the mail log's reply
    server: BadServer | ThreadedSink | None = None
    upstream: dict[str, Any] | None = None


def _plain(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "allow_plaintext": True,
        **TIMEOUTS,
        **extra,
    }


def _tls(port: int, ca: CertAuthority, **extra: Any) -> dict[str, Any]:
    return {
        "host": "mx.test",
        "port": port,
        "tls": "starttls",
        "ca_file": ca.ca_file,
        **TIMEOUTS,
        **extra,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose accept queue is full: a new SYN is dropped, so connect() hangs
    (Linux keeps backlog+1 completed connections, then ignores SYNs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(c)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


def _cases(stack: ExitStack, ca: CertAuthority, backlog_port: int) -> list[Case]:
    def bad(**kw: Any) -> BadServer:
        return stack.enter_context(BadServer(**kw))

    ctx = ca.server_context("mx.test")
    cases: list[Case] = []
    cases.append(Case("refused", "deferred", "connection refused", upstream=_plain(_free_port())))
    cases.append(Case("connect", "deferred", "timed out after 0.6s", upstream=_plain(backlog_port)))
    for step, words in [
        ("greeting", "greeting"),
        ("ehlo", "EHLO"),
        ("mail", "MAIL FROM"),
        ("rcpt", "RCPT TO"),
        ("data", "DATA"),
        ("dot", "DATA"),
    ]:
        srv = bad(stall=step)
        cases.append(
            Case(
                f"stall-{step}",
                "deferred",
                f"timed out waiting for the {words} reply",
                srv,
                _plain(srv.port),
            )
        )
    srv = bad(stall="starttls", starttls=True, tls_context=ctx)
    cases.append(
        Case(
            "stall-starttls",
            "deferred",
            "timed out waiting for the STARTTLS reply",
            srv,
            _tls(srv.port, ca),
        )
    )
    srv = bad(stall="auth", auth=True)
    cases.append(
        Case(
            "stall-auth",
            "deferred",
            "timed out waiting for the AUTH reply",
            srv,
            _plain(srv.port, username="relay", password="env:BAD_PW"),
        )
    )
    srv = bad(hangup="data-body")
    cases.append(Case("hangup-data", "deferred", "lost during DATA", srv, _plain(srv.port)))
    srv = bad(hangup="rcpt")
    cases.append(Case("hangup-rcpt", "deferred", "lost during RCPT TO", srv, _plain(srv.port)))
    srv = bad(reply={"greeting": b"HELLO WORLD\r\n"})
    cases.append(Case("garbage-greeting", "deferred", "HELLO WORLD", srv, _plain(srv.port)))
    srv = bad(reply={"mail": b"2x0 OK\r\n"})
    cases.append(Case("garbage-mail", "deferred", "2x0 OK", srv, _plain(srv.port)))
    # Not a reply code at all (int(" 25") parses!): must never count as a delivery.
    srv = bad(reply={"rcpt": b" 25 sure\r\n"})
    cases.append(Case("garbage-rcpt", "deferred", "25 sure", srv, _plain(srv.port)))
    srv = bad(reply={"dot": b"199 what\r\n"})
    cases.append(Case("garbage-dot", "deferred", "199 what", srv, _plain(srv.port)))
    # A 2xx that is not a MAIL success (RFC 5321 § 4.3.2: only 250) accepted nothing.
    srv = bad(reply={"mail": b"252 2.1.0 maybe\r\n"})
    cases.append(Case("odd-2xx-mail", "deferred", "252 2.1.0 maybe", srv, _plain(srv.port)))
    srv = bad(reply={"ehlo": b"250 " + b"x" * (1 << 20) + b"\r\n"})
    cases.append(Case("huge-ehlo", "deferred", "too long", srv, _plain(srv.port)))
    srv = bad(reply={"greeting": b"554 5.7.1 go away\r\n"})
    cases.append(Case("refusing-greeting", "deferred", "554 5.7.1 go away", srv, _plain(srv.port)))
    # TLS downgrade: the server (or a MITM) does not offer STARTTLS; never sent in clear.
    srv = bad(starttls=False)
    cases.append(
        Case(
            "stripped-starttls",
            "deferred",
            "does not offer it; not sending in plaintext",
            srv,
            _tls(srv.port, ca),
        )
    )
    sink = stack.enter_context(
        ThreadedSink(tls="starttls", tls_context=ca.server_context("other.test"))
    )
    cases.append(
        Case(
            "wrong-name-cert",
            "deferred",
            "certificate verification failed",
            sink,
            _tls(sink.port, ca),
        )
    )
    sink = stack.enter_context(
        ThreadedSink(tls="starttls", tls_context=ca.server_context("mx.test", expired=True))
    )
    cases.append(
        Case("expired-cert", "deferred", "certificate has expired", sink, _tls(sink.port, ca))
    )
    sink = stack.enter_context(
        ThreadedSink(tls="implicit", tls_context=CertAuthority.untrusted_server_context())
    )
    cases.append(
        Case(
            "untrusted-cert",
            "deferred",
            "certificate verification failed",
            sink,
            {**_tls(sink.port, ca), "tls": "implicit"},
        )
    )
    return cases


def test_every_upstream_fault_ends_as_it_should_with_the_reply_logged(
    tmp_path: Path, ca: CertAuthority, full_backlog: int
) -> None:
    with ExitStack() as stack:
        cases = _cases(stack, ca, full_backlog)
        partial = stack.enter_context(
            ThreadedSink(
                script=Script(
                    rcpt={
                        "later@dest.test": "452 4.2.2 mailbox full, try later",
                        "gone@dest.test": "550 5.1.1 no such user here",
                    }
                )
            )
        )
        good = stack.enter_context(ThreadedSink())
        upstreams = {c.name: c.upstream for c in cases if c.upstream is not None}
        upstreams["partial"] = _plain(partial.port)
        upstreams["good"] = _plain(good.port)
        orgs = [{"org": name, "domains": [f"{name}.test"], "upstream": name} for name in upstreams]
        cfg = RelayConfig(
            tmp_path / "relay",
            upstreams=upstreams,
            orgs=orgs,
            default_upstream="good",
            retry={"schedule": ["1h"], "jitter": 0, "max_age": "2h"},
        ).write()
        with RelayProcess(cfg, env=SECRET) as relay:
            for c in cases:
                send(relay.port, f"app@{c.name}.test", [f"{c.name}@dest.test"])
            send(
                relay.port,
                "app@partial.test",
                ["ok@dest.test", "later@dest.test", "gone@dest.test"],
            )
            relay.wait_events("deferred", len(cases) + 1, timeout=30)
            # The relay is healthy after all that: a good upstream still gets its mail.
            send(relay.port, "app@good.test", ["fine@dest.test"])
            good.wait_for(1, 15)
            relay.wait_events("delivered", 2)  # ok@ (partial) and fine@ (good)
            relay.wait_events("bounced", 1)
            log = relay.mail_log()
            output = relay.output()

    final = {e["recipient"]: e for e in log if e["event"] in ("delivered", "deferred", "bounced")}
    problems = []
    for c in cases:
        e = final.get(f"{c.name}@dest.test")
        if e is None or e["event"] != c.outcome or c.reply.lower() not in e["reply"].lower():
            problems.append(f"{c.name}: wanted {c.outcome} with {c.reply!r}, got {e}")
    assert not problems, "\n".join(problems)
    assert all(final[f"{c.name}@dest.test"]["upstream"] == c.name for c in cases)
    # Per recipient, with the partial server's own words.
    assert final["ok@dest.test"]["event"] == "delivered"
    assert final["later@dest.test"]["event"] == "deferred"
    assert final["later@dest.test"]["reply"] == "452 4.2.2 mailbox full, try later"
    assert final["gone@dest.test"]["event"] == "bounced"
    assert final["gone@dest.test"]["reply"] == "550 5.1.1 no such user here"
    assert [m.rcpt_tos for m in partial.messages if m.mail_from] == [["ok@dest.test"]]
    # Nothing reached a misbehaving server as a message, nothing went out in clear, and no
    # secret reached the logs.
    for c in cases:
        if isinstance(c.server, BadServer):
            assert c.server.messages == [], c.name
        elif isinstance(c.server, ThreadedSink):
            assert c.server.messages == [], c.name
    stripped = next(c for c in cases if c.name == "stripped-starttls")
    assert isinstance(stripped.server, BadServer)
    assert not any(cmd.upper().startswith(("MAIL", "AUTH")) for cmd in stripped.server.commands)
    assert "bad-server-pw" not in output and all("bad-server-pw" not in str(e) for e in log)
    assert [m.rcpt_tos for m in good.messages if m.mail_from] == [["fine@dest.test"]]
    # The DSN for gone@ goes to the sender through the DSN upstream (default_upstream: good),
    # never back through the partial server (issue 13).
    assert all(m.rcpt_tos == ["app@partial.test"] for m in good.messages if not m.mail_from)
    assert not [m for m in partial.messages if not m.mail_from]
