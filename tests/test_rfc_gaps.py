"""Issue 12, "RFC gaps" of our SMTP server: RCPT TO:<Postmaster> without a domain (RFC 5321
§ 4.5.1) and the DSN parameters RET, ENVID, NOTIFY and ORCPT (RFC 3461): accepted, kept in
the spool, passed on to an upstream that offers DSN, and NOTIFY honoured for the relay's
own DSNs. Dialogs against a real Listener; end to end through `relay serve`."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path

import pytest

from relay.core.dsn import DsnParams, RcptDsn
from tests import test_listener as kit
from tests.badserver import BadServer
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream
from tests.sinks import Script, ThreadedSink
from tests.test_listener import Client, MakeListener

ca, cert_files, close_clients, make_listener = (
    kit.ca,
    kit.cert_files,
    kit.close_clients,
    kit.make_listener,
)


# -- Postmaster -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
async def test_postmaster_without_a_domain_goes_to_the_configured_address(
    make_listener: MakeListener, path: str
) -> None:
    listener, intake = await make_listener(postmaster="hostmaster@relay.example")
    c = await Client.connect(listener.port)
    await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    await c.cmd(f"RCPT TO:{path}", "250 2.1.5")
    await c.cmd("RCPT TO:<Postmaster@other.example>", "250 2.1.5")  # an ordinary address
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: hi\r\n\r\nfor the postmaster\r\n.\r\n")
    await c.expect("250 2.0.0")
    [(_, envelope)] = intake.submitted
    assert envelope.recipients == ("hostmaster@relay.example", "Postmaster@other.example")


# -- DSN parameters at the listener ---------------------------------------------------------------


async def test_dsn_parameters_are_offered_accepted_and_handed_over(
    make_listener: MakeListener,
) -> None:
    listener, intake = await make_listener()
    c = await Client.connect(listener.port)
    assert "DSN" in await c.ehlo()
    await c.cmd("MAIL FROM:<app@example.com> RET=HDRS ENVID=QQ314159+2Bx", "250 2.1.0")
    await c.cmd(
        "RCPT TO:<a@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+40example.org", "250 2.1.5"
    )
    await c.cmd("RCPT TO:<b@example.org> notify=never", "250 2.1.5")
    await c.cmd("RCPT TO:<c@example.org>", "250 2.1.5")
    await c.cmd("DATA", "354 ")
    await c.send(b"Subject: dsn\r\n\r\nhi\r\n.\r\n")
    await c.expect("250 2.0.0")
    # Malformed values are refused (RFC 3461 § 4), never ignored.
    await c.cmd("MAIL FROM:<app@example.com> RET=BODY", "501 5.5.4")
    await c.cmd("MAIL FROM:<app@example.com> ENVID=a=b", "501 5.5.4")
    await c.cmd("MAIL FROM:<app@example.com>", "250 2.1.0")
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "NOTIFY=", "ORCPT=a@b.example",
                "ORCPT=rfc822;a=b"):
        await c.cmd(f"RCPT TO:<d@example.org> {bad}", "501 5.5.4")
    [(_, envelope)] = intake.submitted
    assert envelope.dsn == DsnParams(
        ret="HDRS",
        envid="QQ314159+2Bx",
        rcpts=(
            ("a@example.org", RcptDsn(("SUCCESS", "FAILURE"), "rfc822;a+40example.org")),
            ("b@example.org", RcptDsn(("NEVER",), None)),
        ),
    )


# -- end to end: kept in the spool, passed on, honoured ------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send_with_dsn(port: int, rcpts: dict[str, str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("app.test")
        assert s.has_extn("dsn")
        s.mail("app@acme.test", ["RET=HDRS", "ENVID=job+2D42"])
        for rcpt, options in rcpts.items():
            code, text = s.rcpt(rcpt, options.split())
            assert code == 250, text
        code, text = s.data(b"From: app@acme.test\r\nSubject: report\r\n\r\nhello\r\n")
        assert code == 250, text


def test_dsn_parameters_survive_a_restart_and_reach_an_upstream_that_offers_dsn(
    tmp_path: Path,
) -> None:
    port = _free_port()  # the upstream is down at first: the message waits in the spool
    cfg = RelayConfig(tmp_path / "relay", upstreams={"up": plain_upstream(port)},
                      default_upstream="up", postmaster="hostmaster@relay.test")
    directory = cfg.write()
    with RelayProcess(directory) as relay:
        _send_with_dsn(relay.port, {"a@example.org": "NOTIFY=SUCCESS ORCPT=rfc822;a+40x.test",
                                    "b@example.org": ""})
        relay.wait_events("deferred", 2)
    with BadServer(extensions=("DSN",)) as dsn_server:
        cfg.doc["upstreams"]["up"]["port"] = dsn_server.port
        cfg.write()
        with RelayProcess(directory) as relay:
            relay.wait_events("delivered", 2)
    mail = [c for c in dsn_server.commands if c.startswith("MAIL")]
    rcpts = [c for c in dsn_server.commands if c.startswith("RCPT")]
    assert mail == [f"MAIL FROM:<app@acme.test> SIZE={_size(mail[0])} RET=HDRS ENVID=job+2D42"]
    assert rcpts == ["RCPT TO:<a@example.org> NOTIFY=SUCCESS ORCPT=rfc822;a+40x.test",
                     "RCPT TO:<b@example.org>"]


def _size(mail: str) -> int:
    return int(mail.split("SIZE=")[1].split()[0])


def test_notify_is_honoured_for_the_relays_own_dsns(tmp_path: Path) -> None:
    refused = {r: "550 5.1.1 no such user" for r in ("never@x.test", "fail@x.test", "plain@x.test")}
    with ThreadedSink(script=Script(rcpt=refused)) as sink:  # aiosmtpd: no DSN extension
        cfg = RelayConfig(tmp_path / "relay", upstreams={"up": plain_upstream(sink.port)},
                          default_upstream="up")
        with RelayProcess(cfg.write()) as relay:
            _send_with_dsn(relay.port, {"never@x.test": "NOTIFY=NEVER",
                                        "fail@x.test": "NOTIFY=FAILURE ORCPT=rfc822;f+2Bx+40x.test",
                                        "plain@x.test": "", "ok@x.test": "NOTIFY=SUCCESS"})
            relay.wait_events("bounced", 3)
            sink.wait_for(2)  # the message to ok@, then one DSN
            _send_with_dsn(relay.port, {"never@x.test": "NOTIFY=NEVER"})
            relay.wait_events("bounced", 4)
            sink.wait_for(2)
            relay.stop()
    kinds = [m.mail_from for m in sink.messages]
    assert kinds == ["app@acme.test", ""]  # the message, then exactly one DSN
    assert sink.messages[0].rcpt_tos == ["ok@x.test"]  # no DSN parameters to a non-DSN server
    dsn = sink.messages[1].data.decode()
    assert "Final-Recipient: rfc822; fail@x.test" in dsn
    assert "Original-Recipient: rfc822; f+x@x.test" in dsn
    assert "Final-Recipient: rfc822; plain@x.test" in dsn  # no NOTIFY: failures are reported
    assert "never@x.test" not in dsn
    assert "Original-Envelope-Id: job-42" in dsn
    queued = [e for e in relay.mail_log() if e["event"] == "queued"]
    assert len(queued) == 1  # the second message (NOTIFY=NEVER only) got no DSN at all
