"""Test connection (relay.probe) against real sinks: each failure stops at the expected step
with the server's own reply and the expected hint; the working one succeeds at every step."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from relay.core.model import EgressSource, Secret, TlsMode, Upstream
from relay.delivery import DnsResolver
from relay.ops.probe import ProbeReport, Step, probe
from tests.certs import CertAuthority
from tests.conftest import MakeSink
from tests.sinks import Script

SOURCE = EgressSource("a", "127.0.0.2", "a.relay.test")
RESOLVER = DnsResolver({"mx.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})


def upstream(port: int, tls: str, ca: CertAuthority, **kw: Any) -> Upstream:
    args: dict[str, Any] = {
        "id": "cust/own", "host": "mx.test", "port": port, "tls": TlsMode(tls), "pool": "default",
        "username": "user@cust.test", "password": Secret("right-pw", "env:CUST_PW"),
        "ca_file": ca.ca_file,
    }
    args.update(kw)
    return Upstream(**args)


def last(report: ProbeReport) -> Step:
    return report.steps[-1]


def names(report: ProbeReport) -> list[str]:
    return [s.name for s in report.steps]


async def test_working_starttls_auth_and_test_message(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="starttls", tls_context=ca.server_context("mx.test"),
                           auth={"user@cust.test": "right-pw"})
    report = await probe(upstream(sink.port, "starttls", ca), SOURCE, RESOLVER,
                         send_to="check@example.org", timeout=5)
    assert report.ok, report.as_text()
    assert names(report) == [
        "resolve", f"connect 127.0.0.1:{sink.port} from 127.0.0.2", "greeting",
        "EHLO a.relay.test", "STARTTLS", "TLS", "EHLO a.relay.test", "AUTH PLAIN",
        "MAIL FROM:<postmaster@a.relay.test>", "RCPT TO:<check@example.org>", "DATA", "QUIT",
    ]
    steps = {s.name: s for s in report.steps}
    assert steps["greeting"].reply is not None and steps["greeting"].reply.startswith("220 ")
    assert steps["STARTTLS"].reply is not None and steps["STARTTLS"].reply.startswith("220")
    assert "certificate for mx.test verified" in steps["TLS"].detail
    assert steps["AUTH PLAIN"].reply is not None and steps["AUTH PLAIN"].reply.startswith("235")
    # From the egress source, and the message really arrived.
    [msg] = sink.messages
    assert (msg.peer_ip, msg.ehlo, msg.auth_identity, msg.rcpt_tos) == (
        "127.0.0.2", "a.relay.test", "user@cust.test", ["check@example.org"])
    assert b"Subject: egress-relay test message" in msg.data
    text = report.as_text()
    assert "right-pw" not in text and "right-pw" not in str(report.as_dict())
    assert text.splitlines()[-1] == "result: every step succeeded"


async def test_mail_rcpt_without_data_sends_nothing(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="implicit", tls_context=ca.server_context("mx.test"),
                           auth={"user@cust.test": "right-pw"},
                           script=Script(mail={"other@cust.test": "553 5.7.1 Sender address rejected: not owned by user"}))
    u = upstream(sink.port, "implicit", ca, from_address="user@cust.test")
    good = await probe(u, SOURCE, RESOLVER, rcpt_to="check@example.org", timeout=5)
    assert good.ok, good.as_text()
    assert names(good)[-4:] == ["MAIL FROM:<user@cust.test>", "RCPT TO:<check@example.org>", "RSET", "QUIT"]
    assert names(good)[2:4] == ["TLS", "greeting"]
    assert sink.messages == []
    bad = await probe(u, SOURCE, RESOLVER, mail_from="other@cust.test", rcpt_to="x@example.org", timeout=5)
    assert not bad.ok
    step = last(bad)
    assert step.name == "MAIL"
    assert step.reply == "553 5.7.1 Sender address rejected: not owned by user"
    assert step.hint is not None and "sender not permitted" in step.hint
    assert "from_address: user@cust.test" in step.hint


async def test_auth_refused(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="starttls", tls_context=ca.server_context("mx.test"),
                           auth={"user@cust.test": "another-pw"})
    report = await probe(upstream(sink.port, "starttls", ca), SOURCE, RESOLVER, timeout=5)
    assert not report.ok
    step = last(report)
    assert step.name == "AUTH PLAIN"
    assert step.reply is not None and step.reply.startswith("535 5.7.8")
    assert step.hint is not None and "refused the username/password" in step.hint
    assert "env:CUST_PW" in step.hint  # the reference, never the value
    assert "right-pw" not in report.as_text()
    assert sink.auth_failures == 1


async def test_wrong_certificate_name(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="starttls", tls_context=ca.server_context("other.test"),
                           auth={"user@cust.test": "right-pw"})
    report = await probe(upstream(sink.port, "starttls", ca), SOURCE, RESOLVER, timeout=5)
    assert not report.ok
    assert names(report)[-2:] == ["STARTTLS", "TLS"]
    step = last(report)
    assert "certificate verification failed" in step.detail
    assert step.hint is not None and "certificate name mismatch" in step.hint
    assert sink.auth_failures == 0 and all("AUTH" not in s.commands for s in sink.sessions)


async def test_untrusted_certificate(make_sink: MakeSink, ca: CertAuthority) -> None:
    sink = await make_sink(tls="implicit", tls_context=CertAuthority.untrusted_server_context("mx.test"))
    report = await probe(upstream(sink.port, "implicit", ca), SOURCE, RESOLVER, timeout=5)
    step = last(report)
    assert (step.name, step.ok) == ("TLS", False)
    assert step.hint is not None and "ca_file" in step.hint


async def test_implicit_tls_server_on_a_starttls_setting(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="implicit", tls_context=ca.server_context("mx.test"))
    report = await probe(upstream(sink.port, "starttls", ca), SOURCE, RESOLVER, timeout=1)
    step = last(report)
    assert (step.name, step.ok) == ("greeting", False)
    assert step.hint is not None and "implicit TLS" in step.hint and "tls: implicit" in step.hint


async def test_starttls_server_on_an_implicit_setting(ca: CertAuthority, make_sink: MakeSink) -> None:
    sink = await make_sink(tls="starttls", tls_context=ca.server_context("mx.test"))
    report = await probe(upstream(sink.port, "implicit", ca), SOURCE, RESOLVER, timeout=2)
    step = last(report)
    assert (step.name, step.ok) == ("TLS", False), report.as_text()
    assert step.hint is not None and "wrong port for the TLS mode" in step.hint
    assert "tls: starttls" in step.hint


async def test_connection_refused_from_the_egress_ip(ca: CertAuthority) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report = await probe(upstream(port, "starttls", ca), SOURCE, RESOLVER, timeout=2)
    step = last(report)
    assert step.name == f"connect 127.0.0.1:{port} from 127.0.0.2" and not step.ok
    assert step.detail == "connection refused"
    assert step.hint is not None and "allowlist 127.0.0.2" in step.hint


async def test_greeting_refusal_names_the_egress_ip(make_sink: MakeSink, ca: CertAuthority) -> None:
    # A server that answers 554 at once (not on the allowlist).
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 Access denied for 127.0.0.2\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        report = await probe(upstream(port, "starttls", ca), SOURCE, RESOLVER, timeout=2)
    step = last(report)
    assert (step.name, step.reply) == ("greeting", "554 5.7.1 Access denied for 127.0.0.2")
    assert step.hint is not None and "allowlist" in step.hint


@pytest.mark.parametrize("reply,needle", [
    ("550 5.7.1 Relaying denied", "relaying denied"),
    ("450 4.2.0 greylisted", "for now"),
])
async def test_rcpt_refusals(ca: CertAuthority, make_sink: MakeSink, reply: str, needle: str) -> None:
    sink = await make_sink(script=Script(rcpt={"*": reply}))
    u = upstream(sink.port, "none", ca, username=None, password=None)
    report = await probe(u, SOURCE, RESOLVER, rcpt_to="x@example.org", timeout=5)
    step = last(report)
    assert (step.name, step.reply) == ("RCPT", reply)
    assert step.hint is not None and needle in step.hint
    assert [s.name for s in report.steps if s.name in ("TLS", "AUTH")] == ["TLS", "AUTH"]
