"""The test sinks themselves: the threaded variant works from synchronous code, scripted
replies are served in order, and the records say what a real client did."""

from __future__ import annotations

import asyncio
import smtplib
import ssl

import pytest

from tests.certs import CertAuthority
from tests.conftest import MakeSink
from tests.sinks import Script, Sink, ThreadedSink


def test_threaded_sink_from_synchronous_code(ca: CertAuthority) -> None:
    script = Script(rcpt={"gone@x.test": "550 5.1.1 no such user"}, data=["451 4.3.0 try later"])
    with ThreadedSink(
        tls="starttls",
        tls_context=ca.server_context("mx.test", "127.0.0.1"),
        auth={"u": "p"},
        script=script,
    ) as sink:
        client_ctx = ssl.create_default_context(cafile=ca.ca_file)
        with smtplib.SMTP("127.0.0.1", sink.port, source_address=("127.0.0.3", 0)) as smtp:
            smtp.ehlo("client.test")
            smtp.starttls(context=client_ctx)  # smtplib checks the name it dialled
            smtp.ehlo("client.test")
            smtp.login("u", "p")
            with pytest.raises(smtplib.SMTPDataError) as first:
                smtp.sendmail("s@x.test", ["ok@x.test"], b"Subject: 1\r\n\r\nx\r\n")
            assert first.value.smtp_code == 451
            refused = smtp.sendmail(
                "s@x.test", ["ok@x.test", "gone@x.test"], b"Subject: 2\r\n\r\nx\r\n"
            )
            assert refused == {"gone@x.test": (550, b"5.1.1 no such user")}
        sink.wait_for(1, 5)
        sink.wait_idle(5)
        [msg] = sink.messages
        assert msg.peer_ip == "127.0.0.3"
        assert msg.ehlo == "client.test"
        assert msg.auth_identity == "u"
        assert msg.tls is True
        assert msg.rcpt_tos == ["ok@x.test"]
        assert msg.data == b"Subject: 2\r\n\r\nx\r\n"
        [session] = sink.sessions
        assert session.closed
        assert session.commands[-1] == "QUIT"
        assert sink.recipients == ["ok@x.test"]


def test_threaded_sink_refuses_wrong_credentials() -> None:
    with ThreadedSink(auth={"u": "p"}, auth_require_tls=False) as sink:
        with smtplib.SMTP("127.0.0.1", sink.port) as smtp:
            smtp.ehlo("c.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                smtp.login("u", "wrong")
            assert err.value.smtp_code == 535
            assert b"5.7.8" in err.value.smtp_error
            # auth is required before MAIL
            code, _ = smtp.mail("s@x.test")
            assert code == 530
        assert sink.sink is not None
        assert sink.sink.auth_failures >= 1  # smtplib tries each mechanism offered
        assert sink.messages == []


async def test_sink_counts_concurrent_sessions(make_sink: MakeSink) -> None:
    sink = await make_sink()
    conns = [await asyncio.open_connection("127.0.0.1", sink.port) for _ in range(3)]
    await sink.wait_until(lambda: sink.active == 3)
    assert sink.max_concurrent == 3
    for _, writer in conns:
        writer.close()
    await sink.wait_idle()
    assert sink.max_concurrent == 3
    assert len(sink.sessions) == 3


async def test_sink_requires_a_context_for_tls() -> None:
    with pytest.raises(ValueError, match="tls_context"):
        Sink(tls="implicit")
