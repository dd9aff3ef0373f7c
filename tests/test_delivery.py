"""Delivery against real aiosmtpd sinks on loopback: TLS, AUTH, egress binding, pooling,
per-recipient outcomes and every kind of failure turning into a deferral with a clear text."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import warnings
from collections.abc import AsyncIterator

import pytest

from relay.core.errors import PermanentError
from relay.core.model import (
    EgressSource,
    Outcome,
    Secret,
    Throttle,
    TlsMode,
    Upstream,
)
from relay.delivery import Deliverer, DnsResolver
from tests.certs import CertAuthority
from tests.conftest import MakeSink
from tests.sinks import Script, Sink, loopback_upstream

SRC2 = EgressSource("edge-2", "127.0.0.2", "egress2.relay.test")
SRC3 = EgressSource("edge-3", "127.0.0.3", "egress3.relay.test")
HOSTS = {"mx.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
MSG = b"From: app@saas.test\r\nTo: rcpt@customer.test\r\nSubject: hello\r\n\r\nHello.\r\n"
PASSWORD = "s3cr3t-Pa55word"


def upstream(sink: Sink, **kw: object) -> Upstream:
    return loopback_upstream(sink.port, **kw)


@pytest.fixture
async def deliverer() -> AsyncIterator[Deliverer]:
    d = Deliverer(DnsResolver(HOSTS), idle_timeout=10.0, data_timeout=3.0, quit_timeout=1.0)
    yield d
    await d.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- plain, TLS, AUTH ------------------------------------------------------------------


async def test_plain_delivery_records_envelope_source_and_ehlo(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    results = await deliverer.deliver(
        upstream(sink), SRC2, "app@saas.test", ["a@customer.test", "b@customer.test"], MSG
    )
    assert [(r.recipient, r.outcome) for r in results] == [
        ("a@customer.test", Outcome.DELIVERED),
        ("b@customer.test", Outcome.DELIVERED),
    ]
    assert results[0].reply.code == 250
    assert results[0].reply.text == "2.0.0 OK queued"
    assert results[0].reply.enhanced == "2.0.0"
    [msg] = sink.messages
    assert msg.peer_ip == "127.0.0.2"
    assert msg.ehlo == "egress2.relay.test"
    assert msg.mail_from == "app@saas.test"
    assert msg.rcpt_tos == ["a@customer.test", "b@customer.test"]
    assert msg.data == MSG
    assert msg.tls is False
    assert msg.auth_identity is None
    assert f"SIZE={len(MSG)}" in msg.mail_options


async def test_each_source_address_is_seen_by_the_sink(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    up = upstream(sink)
    await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    await deliverer.deliver(up, SRC3, "s@saas.test", ["r@x.test"], MSG)
    assert [m.peer_ip for m in sink.messages] == ["127.0.0.2", "127.0.0.3"]
    assert [m.ehlo for m in sink.messages] == ["egress2.relay.test", "egress3.relay.test"]
    # Different source → different pool key → different connection.
    assert [s.peer_ip for s in sink.sessions] == ["127.0.0.2", "127.0.0.3"]


async def test_starttls_verified_against_upstream_name(
    make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority
) -> None:
    sink = await make_sink(tls="starttls", tls_context=ca.server_context("mx.test"))
    up = upstream(sink, tls=TlsMode.STARTTLS, ca_file=ca.ca_file)
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    [msg] = sink.messages
    assert msg.tls is True
    # RFC 3207 § 4.2: EHLO again after the handshake.
    assert sink.sessions[0].commands[:3] == ["EHLO", "STARTTLS", "EHLO"]


async def test_implicit_tls(make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority) -> None:
    sink = await make_sink(tls="implicit", tls_context=ca.server_context("mx.test"))
    up = upstream(sink, tls=TlsMode.IMPLICIT, ca_file=ca.ca_file)
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert sink.messages[0].tls is True
    assert "STARTTLS" not in sink.sessions[0].commands


async def test_auth_with_right_credentials(
    make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority
) -> None:
    sink = await make_sink(
        tls="starttls", tls_context=ca.server_context("mx.test"), auth={"apikey": PASSWORD}
    )
    up = upstream(
        sink,
        tls=TlsMode.STARTTLS,
        ca_file=ca.ca_file,
        username="apikey",
        password=Secret(PASSWORD, "env:TEST"),
    )
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert sink.messages[0].auth_identity == "apikey"
    assert sink.sessions[0].commands.index("AUTH") > sink.sessions[0].commands.index("STARTTLS")


async def test_auth_with_wrong_credentials_defers_and_never_shows_the_password(
    make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = await make_sink(
        tls="implicit", tls_context=ca.server_context("mx.test"), auth={"apikey": "other"}
    )
    up = upstream(
        sink,
        tls=TlsMode.IMPLICIT,
        ca_file=ca.ca_file,
        username="apikey",
        password=Secret(PASSWORD, "env:TEST"),
    )
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    # Bad credentials are an administrator's problem: the mail waits, it is not bounced.
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.code == 535
    assert result.reply.text == "5.7.8 Authentication credentials invalid"
    assert result.reply.enhanced == "5.7.8"
    assert not result.throttled
    assert sink.auth_failures == 1
    assert sink.messages == []
    assert PASSWORD not in caplog.text
    assert PASSWORD not in str(result)


async def test_auth_over_plaintext_when_the_server_allows_it(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(auth={"u1": PASSWORD}, auth_require_tls=False)
    up = upstream(sink, username="u1", password=Secret(PASSWORD, "file:x"))
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert sink.messages[0].auth_identity == "u1"


async def test_auth_not_offered_before_tls_defers(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(auth={"u1": PASSWORD})  # requires TLS for AUTH, offers none
    up = upstream(sink, username="u1", password=Secret(PASSWORD, "file:x"))
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert "does not offer AUTH" in result.reply.text
    assert sink.messages == []


# --- TLS failures -------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        ("wrong-name", "Hostname mismatch"),
        ("expired", "certificate has expired"),
        ("untrusted", "unable to get local issuer certificate"),
    ],
)
async def test_bad_certificate_defers_with_a_clear_text_and_delivers_nothing(
    make_sink: MakeSink,
    deliverer: Deliverer,
    ca: CertAuthority,
    tls: TlsMode,
    problem: str,
    expected: str,
) -> None:
    contexts = {
        "wrong-name": lambda: ca.server_context("other.test"),
        "expired": lambda: ca.server_context("mx.test", expired=True),
        "untrusted": lambda: CertAuthority.untrusted_server_context("mx.test"),
    }
    sink = await make_sink(tls=tls.value, tls_context=contexts[problem]())
    up = upstream(sink, tls=tls, ca_file=ca.ca_file)
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.code == 454
    assert result.reply.enhanced == "4.7.5"
    assert f"TLS certificate verification failed for mx.test at 127.0.0.1:{sink.port}" in (
        result.reply.text
    )
    assert expected in result.reply.text
    assert sink.messages == []
    assert all("MAIL" not in s.commands for s in sink.sessions)


async def test_starttls_required_but_not_offered_defers(
    make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority
) -> None:
    sink = await make_sink()  # plaintext only
    up = upstream(sink, tls=TlsMode.STARTTLS, ca_file=ca.ca_file)
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.code == 454
    assert result.reply.enhanced == "4.7.10"
    assert "STARTTLS is required" in result.reply.text
    assert "does not offer it" in result.reply.text
    assert sink.messages == []
    assert sink.sessions[0].commands == ["EHLO"]


async def test_verify_tls_false_delivers_and_warns_once_per_upstream(
    make_sink: MakeSink, deliverer: Deliverer, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await make_sink(
        tls="starttls", tls_context=CertAuthority.untrusted_server_context("whatever.test")
    )
    up = upstream(sink, tls=TlsMode.STARTTLS, verify_tls=False)
    with caplog.at_level(logging.WARNING):
        for source in (SRC2, SRC3):  # two connections
            [result] = await deliverer.deliver(up, source, "s@saas.test", ["r@x.test"], MSG)
            assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(sink.sessions) == 2
    warnings = [r for r in caplog.records if "verification is disabled" in r.getMessage()]
    assert len(warnings) == 1
    assert "up" in warnings[0].getMessage()


# --- pooling ------------------------------------------------------------------------------


async def test_connection_is_reused_for_several_messages(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    up = upstream(sink)
    for i in range(3):
        [result] = await deliverer.deliver(up, SRC2, "s@saas.test", [f"r{i}@x.test"], MSG)
        assert result.outcome is Outcome.DELIVERED
    assert len(sink.messages) == 3
    assert len(sink.sessions) == 1
    assert sink.sessions[0].commands.count("MAIL") == 3
    # Each transaction ended with DATA's reply, which resets the server: no RSET needed.
    assert sink.sessions[0].commands.count("RSET") == 0


async def test_rset_before_reusing_a_session_whose_transaction_did_not_finish(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(script=Script(rcpt={"gone@x.test": "550 5.1.1 no such user"}))
    up = upstream(sink)
    [refused] = await deliverer.deliver(up, SRC2, "s@saas.test", ["gone@x.test"], MSG)
    assert refused.outcome is Outcome.BOUNCED  # MAIL accepted, no DATA: state not reset
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED
    assert sink.sessions[0].commands == ["EHLO", "MAIL", "RCPT", "RSET", "MAIL", "RCPT", "DATA"]


async def test_max_messages_per_connection(make_sink: MakeSink, deliverer: Deliverer) -> None:
    sink = await make_sink()
    up = upstream(sink, throttle=Throttle(max_messages_per_connection=2))
    for i in range(5):
        [result] = await deliverer.deliver(up, SRC2, "s@saas.test", [f"r{i}@x.test"], MSG)
        assert result.outcome is Outcome.DELIVERED
    assert [s.messages for s in sink.sessions] == [2, 2, 1]
    await sink.wait_until(lambda: sink.sessions[1].closed)
    assert sink.sessions[0].commands[-1] == "QUIT"
    assert sink.sessions[1].commands[-1] == "QUIT"
    assert not sink.sessions[2].closed


async def test_different_usernames_never_share_a_connection(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(auth={"alice": "pw-a", "bob": "pw-b"}, auth_require_tls=False)
    alice = upstream(sink, id="org-a/smtp", username="alice", password=Secret("pw-a", "env:A"))
    bob = upstream(sink, id="org-b/smtp", username="bob", password=Secret("pw-b", "env:B"))
    for up in (alice, bob, alice, bob):
        [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r@x.test"], MSG)
        assert result.outcome is Outcome.DELIVERED, result.reply
    assert [m.auth_identity for m in sink.messages] == ["alice", "bob", "alice", "bob"]
    assert [m.session for m in sink.messages] == [1, 2, 1, 2]
    assert [s.auth_identity for s in sink.sessions] == ["alice", "bob"]


async def test_dead_pooled_connection_reconnects_transparently(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    up = upstream(sink)
    await deliverer.deliver(up, SRC2, "s@saas.test", ["r1@x.test"], MSG)
    sink.drop_connections()  # e.g. the server's idle timeout
    await sink.wait_idle()
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r2@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(sink.sessions) == 2
    assert sink.recipients == ["r1@x.test", "r2@x.test"]


async def test_pooled_connection_refusing_rset_reconnects(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    # The connection looks alive but the server closes it at the next command: nothing
    # was sent yet, so the deliverer opens a fresh one without bothering the scheduler.
    sink = await make_sink(
        script=Script(
            rset=["421 4.4.2 idle too long, closing"], rcpt={"gone@x.test": "550 5.1.1 no"}
        )
    )
    up = upstream(sink)
    await deliverer.deliver(
        up, SRC2, "s@saas.test", ["gone@x.test"], MSG
    )  # leaves a transaction open
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r2@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(sink.sessions) == 2
    assert sink.sessions[0].commands[-1] == "RSET"
    assert sink.recipients == ["r2@x.test"]


async def test_pooled_connection_closed_at_mail_reconnects(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    # Without an RSET first, a server that dropped our idle connection says so at MAIL.
    mails: list[str] = []

    def mail(sender: str) -> str | None:
        mails.append(sender)
        return "421 4.4.2 idle too long, closing" if len(mails) == 2 else None

    sink = await make_sink(script=Script(mail_fn=mail))
    up = upstream(sink)
    await deliverer.deliver(up, SRC2, "s@saas.test", ["r1@x.test"], MSG)
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["r2@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert len(sink.sessions) == 2 and len(mails) == 3
    assert sink.recipients == ["r1@x.test", "r2@x.test"]


async def test_idle_connections_are_closed_after_idle_timeout(make_sink: MakeSink) -> None:
    sink = await make_sink()
    deliverer = Deliverer(DnsResolver(HOSTS), idle_timeout=0.2)
    try:
        await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["r@x.test"], MSG)
        assert sink.active == 1
        await sink.wait_idle(within=5)
        assert sink.sessions[0].commands[-1] == "QUIT"
        assert deliverer.pool.idle_count() == 0
    finally:
        await deliverer.close()


async def test_close_quits_idle_connections(make_sink: MakeSink) -> None:
    sink = await make_sink()
    deliverer = Deliverer(DnsResolver(HOSTS))
    await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["r@x.test"], MSG)
    await deliverer.deliver(upstream(sink), SRC3, "s@saas.test", ["r@x.test"], MSG)
    await deliverer.close()
    await sink.wait_idle()
    assert [s.commands[-1] for s in sink.sessions] == ["QUIT", "QUIT"]


async def test_concurrent_deliveries_and_max_idle_per_key(make_sink: MakeSink) -> None:
    sink = await make_sink(script=Script(data_delay=0.2))
    deliverer = Deliverer(DnsResolver(HOSTS), max_idle_per_key=1)
    try:
        up = upstream(sink)
        results = await asyncio.gather(
            *(deliverer.deliver(up, SRC2, "s@saas.test", [f"r{i}@x.test"], MSG) for i in range(3))
        )
        assert all(r[0].outcome is Outcome.DELIVERED for r in results)
        assert sink.max_concurrent == 3
        assert deliverer.pool.idle_count() == 1
        await sink.wait_until(lambda: sink.active == 1)
        assert sum(1 for s in sink.sessions if s.commands[-1] == "QUIT") == 2
    finally:
        await deliverer.close()


# --- per-recipient outcomes --------------------------------------------------------------


async def test_mix_of_accepted_and_refused_recipients(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    script = Script(
        rcpt={
            "gone@x.test": "550 5.1.1 no such user",
            "busy@x.test": "450 4.2.1 mailbox busy",
        }
    )
    sink = await make_sink(script=script)
    rcpts = ["ok1@x.test", "gone@x.test", "busy@x.test", "ok2@x.test"]
    results = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", rcpts, MSG)
    assert [r.recipient for r in results] == rcpts
    assert [r.outcome for r in results] == [
        Outcome.DELIVERED,
        Outcome.BOUNCED,
        Outcome.DEFERRED,
        Outcome.DELIVERED,
    ]
    assert results[1].reply.code == 550
    assert results[1].reply.text == "5.1.1 no such user"
    assert results[1].reply.enhanced == "5.1.1"
    assert results[2].reply.text == "4.2.1 mailbox busy"
    assert not any(r.throttled for r in results)
    assert sink.messages[0].rcpt_tos == ["ok1@x.test", "ok2@x.test"]


async def test_all_recipients_refused_sends_no_data(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    gone = {"a@x.test": "550 5.1.1 no such user", "b@x.test": "550 5.1.1 no such user"}
    sink = await make_sink(script=Script(rcpt=gone))
    results = await deliverer.deliver(
        upstream(sink), SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG
    )
    assert [r.outcome for r in results] == [Outcome.BOUNCED, Outcome.BOUNCED]
    assert "DATA" not in sink.sessions[0].commands
    # The connection is still good for the next message.
    [ok] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["c@x.test"], MSG)
    assert ok.outcome is Outcome.DELIVERED
    assert len(sink.sessions) == 1


async def test_data_4xx_defers_with_verbatim_text_then_succeeds(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(script=Script(data=["451 4.3.0 try later"]))
    up = upstream(sink)
    results = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG)
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert str(results[0].reply) == "451 4.3.0 try later"
    assert results[0].reply.enhanced == "4.3.0"
    assert not results[0].throttled
    assert sink.messages == []
    results = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG)
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]


async def test_data_5xx_bounces_accepted_recipients(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(script=Script(data=["554 5.7.1 message content rejected"]))
    results = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert results[0].outcome is Outcome.BOUNCED
    assert results[0].reply.text == "5.7.1 message content rejected"


async def test_421_is_throttled_and_the_next_delivery_reconnects(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    replies = ["421 4.7.0 slow down"]
    sink = await make_sink(script=Script(mail_fn=lambda _addr: replies.pop() if replies else None))
    up = upstream(sink)
    results = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG)
    assert [(r.outcome, r.throttled) for r in results] == [(Outcome.DEFERRED, True)] * 2
    assert str(results[0].reply) == "421 4.7.0 slow down"
    await sink.wait_idle()  # the sink closed the channel after 421
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED
    assert len(sink.sessions) == 2


async def test_451_policy_code_at_rcpt_is_throttled(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(script=Script(rcpt={"*": "451 4.7.1 Rate limit exceeded for sender"}))
    [result] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert result.throttled


async def test_mail_from_refused_applies_to_all(make_sink: MakeSink, deliverer: Deliverer) -> None:
    sink = await make_sink(script=Script(mail={"*": "553 5.7.1 sender not allowed"}))
    results = await deliverer.deliver(
        upstream(sink), SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG
    )
    assert [r.outcome for r in results] == [Outcome.BOUNCED, Outcome.BOUNCED]
    assert results[0].reply.text == "5.7.1 sender not allowed"


# --- envelope rewriting and extensions ----------------------------------------------------


async def test_from_address_rewrites_sender_but_not_the_null_sender(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    up = upstream(sink, from_address="verified@customer.test")
    await deliverer.deliver(up, SRC2, "app@saas.test", ["a@x.test"], MSG)
    await deliverer.deliver(up, SRC2, "", ["a@x.test"], MSG)  # a DSN keeps <>
    assert [m.mail_from for m in sink.messages] == ["verified@customer.test", ""]


async def test_ehlo_refused_falls_back_to_helo(make_sink: MakeSink, deliverer: Deliverer) -> None:
    sink = await make_sink(script=Script(ehlo=False))
    [result] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DELIVERED, result.reply
    assert sink.sessions[0].commands[:2] == ["EHLO", "HELO"]
    assert sink.messages[0].ehlo == "egress2.relay.test"
    assert sink.messages[0].mail_options == []  # no ESMTP parameters after HELO


async def test_smtputf8_and_8bitmime_parameters(make_sink: MakeSink, deliverer: Deliverer) -> None:
    sink = await make_sink()
    body = "Subject: café\r\n\r\nnaïve\r\n".encode()
    [result] = await deliverer.deliver(upstream(sink), SRC2, "jösé@saas.test", ["ü@x.test"], body)
    assert result.outcome is Outcome.DELIVERED, result.reply
    [msg] = sink.messages
    assert msg.mail_from == "jösé@saas.test"
    assert msg.rcpt_tos == ["ü@x.test"]
    assert "SMTPUTF8" in msg.mail_options
    assert "BODY=8BITMIME" in msg.mail_options
    assert msg.data == body


async def test_ascii_message_gets_no_extension_parameters(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert sink.messages[0].mail_options == [f"SIZE={len(MSG)}"]


async def test_utf8_address_to_server_without_smtputf8_bounces_5_6_7(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink(smtputf8=False)
    results = await deliverer.deliver(
        upstream(sink), SRC2, "s@saas.test", ["ü@x.test", "plain@x.test"], MSG
    )
    assert [r.outcome for r in results] == [Outcome.BOUNCED, Outcome.DELIVERED]
    assert results[0].reply.code == 553
    assert results[0].reply.enhanced == "5.6.7"
    assert sink.messages[0].rcpt_tos == ["plain@x.test"]
    results = await deliverer.deliver(upstream(sink), SRC2, "jösé@saas.test", ["a@x.test"], MSG)
    assert results[0].outcome is Outcome.BOUNCED
    assert results[0].reply.enhanced == "5.6.7"
    assert len(sink.messages) == 1


# --- network failures ---------------------------------------------------------------------


async def test_connection_refused_defers_with_what_happened(deliverer: Deliverer) -> None:
    port = closed_port()
    up = Upstream(id="gone", host="127.0.0.1", port=port, tls=TlsMode.NONE, pool="p")
    results = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test", "b@x.test"], MSG)
    assert [r.outcome for r in results] == [Outcome.DEFERRED, Outcome.DEFERRED]
    assert results[0].reply.code == 451
    assert results[0].reply.enhanced == "4.4.1"
    assert results[0].reply.text == f"4.4.1 connection refused by 127.0.0.1:{port} from 127.0.0.2"
    assert not results[0].throttled


async def test_addresses_are_tried_in_order(make_sink: MakeSink) -> None:
    sink = await make_sink()
    deliverer = Deliverer(DnsResolver({"mx.test": ["127.0.0.9", "127.0.0.1"]}))
    try:
        [result] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
        assert result.outcome is Outcome.DELIVERED, result.reply
    finally:
        await deliverer.close()


async def test_all_addresses_failing_names_each(make_sink: MakeSink) -> None:
    port = closed_port()
    deliverer = Deliverer(DnsResolver({"mx.test": ["127.0.0.9", "127.0.0.1"]}))
    try:
        up = Upstream(id="u", host="mx.test", port=port, tls=TlsMode.NONE, pool="p")
        [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
        assert result.outcome is Outcome.DEFERRED
        assert f"refused by 127.0.0.9:{port}" in result.reply.text
        assert f"refused by 127.0.0.1:{port}" in result.reply.text
    finally:
        await deliverer.close()


async def test_silent_server_times_out(deliverer: Deliverer) -> None:
    # Accepts TCP but never sends a greeting.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        up = Upstream(
            id="mute",
            host="127.0.0.1",
            port=port,
            tls=TlsMode.NONE,
            pool="p",
            connect_timeout=0.3,
            command_timeout=0.3,
        )
        [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
        assert result.outcome is Outcome.DEFERRED
        assert result.reply.enhanced == "4.4.2"
        assert "timed out waiting for the greeting" in result.reply.text
    finally:
        server.close()


async def test_slow_data_reply_times_out_and_defers(make_sink: MakeSink) -> None:
    sink = await make_sink(script=Script(data_delay=2.0))
    deliverer = Deliverer(DnsResolver(HOSTS), data_timeout=0.3)
    try:
        [result] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
        assert result.outcome is Outcome.DEFERRED
        assert f"timed out waiting for the DATA reply from 127.0.0.1:{sink.port}" in (
            result.reply.text
        )
        assert deliverer.pool.idle_count() == 0  # a timed-out session is never reused
    finally:
        await deliverer.close()


async def test_server_disconnect_mid_transaction_defers(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink: Sink | None = None

    def drop(_address: str) -> str | None:
        assert sink is not None
        sink.drop_connections()
        return None

    sink = await make_sink(script=Script(rcpt_fn=drop))
    [result] = await deliverer.deliver(upstream(sink), SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.enhanced == "4.4.2"
    assert "RCPT TO" in result.reply.text
    assert sink.messages == []


async def test_unresolvable_upstream_defers(deliverer: Deliverer) -> None:
    class NoSuchName:
        async def resolve(self, host: str, family: int) -> list[str]:
            raise PermanentError(f"{host}: no such domain (NXDOMAIN)", code=550, enhanced="5.1.2")

    d = Deliverer(NoSuchName())
    up = Upstream(id="typo", host="smtp.sendgird.net", port=587, tls=TlsMode.STARTTLS, pool="p")
    [result] = await d.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
    await d.close()
    assert result.outcome is Outcome.DEFERRED
    assert result.reply.enhanced == "4.4.3"
    assert "smtp.sendgird.net" in result.reply.text
    assert "NXDOMAIN" in result.reply.text


async def test_unbindable_source_address_defers(make_sink: MakeSink, deliverer: Deliverer) -> None:
    sink = await make_sink()
    bogus = EgressSource("bogus", "192.0.2.77", "bogus.test")  # TEST-NET-1, not on this host
    [result] = await deliverer.deliver(upstream(sink), bogus, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert "cannot bind egress source bogus (192.0.2.77)" in result.reply.text
    assert sink.sessions == []


async def test_no_recipients_is_a_no_op(deliverer: Deliverer) -> None:
    up = Upstream(id="u", host="mx.test", port=1, tls=TlsMode.NONE, pool="p")
    assert await deliverer.deliver(up, SRC2, "s@saas.test", [], MSG) == []


async def test_ipv6_source_uses_aaaa_and_binds_v6(make_sink: MakeSink) -> None:
    sink = await make_sink(host="::1")
    v6 = EgressSource("edge-v6", "::1", "egress6.relay.test")
    deliverer = Deliverer(DnsResolver({"mx.test": ["127.0.0.1", "::1"]}))
    try:
        [result] = await deliverer.deliver(upstream(sink), v6, "s@saas.test", ["a@x.test"], MSG)
        assert result.outcome is Outcome.DELIVERED, result.reply
        assert sink.messages[0].peer_ip == "::1"
        port = closed_port()
        up = Upstream(id="v6", host="mx.test", port=port, tls=TlsMode.NONE, pool="p")
        [result] = await deliverer.deliver(up, v6, "s@saas.test", ["a@x.test"], MSG)
        assert result.reply.text == f"4.4.1 connection refused by [::1]:{port} from ::1"
    finally:
        await deliverer.close()


async def test_a_resolver_bug_fails_closed_as_a_deferral(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        async def resolve(self, host: str, family: int) -> list[str]:
            raise RuntimeError("bug")

    d = Deliverer(Broken())
    up = Upstream(id="u", host="mx.test", port=25, tls=TlsMode.NONE, pool="p")
    with caplog.at_level(logging.ERROR):
        [result] = await d.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
    await d.close()
    assert result.outcome is Outcome.DEFERRED
    assert str(result.reply) == "451 4.3.0 local error during delivery, will retry"
    assert "unexpected error" in caplog.text


@pytest.mark.parametrize("pipelining", [False, True])
async def test_421_at_rcpt_defers_the_untried_recipients_too(
    make_sink: MakeSink, deliverer: Deliverer, pipelining: bool
) -> None:
    script = Script(
        rcpt={"b@x.test": "421 4.7.0 too many connections from your IP"}, pipelining=pipelining
    )
    sink = await make_sink(script=script)
    results = await deliverer.deliver(
        upstream(sink), SRC2, "s@saas.test", ["a@x.test", "b@x.test", "c@x.test"], MSG
    )
    assert [(r.outcome, r.throttled) for r in results] == [(Outcome.DEFERRED, True)] * 3
    assert {str(r.reply) for r in results} == {"421 4.7.0 too many connections from your IP"}
    assert sink.messages == []
    # Lock-step, c is never sent; pipelined, it went in the same group as b (RFC 2920)
    # and the server may even have answered it, but after a 421 nothing more is read.
    assert sink.sessions[0].commands.count("RCPT") == (3 if pipelining else 2)


async def test_unavailable_upstream_defers_without_connecting(
    make_sink: MakeSink, deliverer: Deliverer
) -> None:
    sink = await make_sink()
    up = upstream(sink, unavailable="password file /run/creds/x missing")
    [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
    assert result.outcome is Outcome.DEFERRED
    assert (
        str(result.reply) == "451 4.3.5 upstream up unavailable: password file /run/creds/x missing"
    )
    assert sink.sessions == []


async def test_failed_sessions_leak_no_sockets(
    make_sink: MakeSink, deliverer: Deliverer, ca: CertAuthority
) -> None:
    bad_cert = await make_sink(tls="implicit", tls_context=ca.server_context("other.test"))
    no_tls = await make_sink()
    failing = [
        upstream(bad_cert, id="a", tls=TlsMode.IMPLICIT, ca_file=ca.ca_file),
        upstream(no_tls, id="b", tls=TlsMode.STARTTLS, ca_file=ca.ca_file),
        Upstream(id="c", host="127.0.0.1", port=closed_port(), tls=TlsMode.NONE, pool="p"),
    ]
    # Earlier tests' garbage (their sinks' server-side transports, collected late) must not
    # be counted as ours: collect it before the window we measure.
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(5):
            for up in failing:
                [result] = await deliverer.deliver(up, SRC2, "s@saas.test", ["a@x.test"], MSG)
                assert result.outcome is Outcome.DEFERRED
        await bad_cert.wait_idle()
        await no_tls.wait_idle()
        await asyncio.sleep(0)  # let transports run their scheduled connection_lost
        gc.collect()  # a socket nobody closed would be closed here, with a ResourceWarning
    leaks = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert leaks == []
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_socket_connected_to_itself_is_refused() -> None:
    import errno
    import socket

    from relay.delivery.connection import refuse_self_connect

    # TCP simultaneous open: bound to a port and connected to that same port, a socket
    # connects to itself (what a retry to a down loopback upstream can hit by chance).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.connect(s.getsockname())
        with pytest.raises(ConnectionRefusedError) as info:
            refuse_self_connect(s)
        assert info.value.errno == errno.ECONNREFUSED
    with socket.socket() as listener, socket.socket() as client:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client.connect(listener.getsockname())
        refuse_self_connect(client)  # a normal connection passes
