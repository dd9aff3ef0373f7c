"""End to end: the real `relay serve` subprocess between smtplib clients and aiosmtpd sinks
standing in for SendGrid, Mailjet and a customer's own server (issue: the relay path)."""

from __future__ import annotations

import re
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import CertAuthority
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink

SECRETS = {"SENDGRID_API_KEY": "SG.test-key", "MAILJET_API_KEY": "mj-user", "MAILJET_SECRET_KEY": "mj-secret",
           "CONTOSO_PW": "contoso-pw"}


def upstream(sink: ThreadedSink, ca: CertAuthority, tls: str, **extra: Any) -> dict[str, Any]:
    return {"host": "mx.test", "port": sink.port, "tls": tls, "ca_file": ca.ca_file, **extra}


@pytest.fixture
def three_sinks(ca: CertAuthority) -> Iterator[tuple[ThreadedSink, ThreadedSink, ThreadedSink]]:
    ctx = ca.server_context("mx.test")
    with ThreadedSink(tls="starttls", tls_context=ctx, auth={"apikey": "SG.test-key"}) as sg, \
            ThreadedSink(tls="starttls", tls_context=ctx, auth={"mj-user": "mj-secret"}) as mj, \
            ThreadedSink(tls="implicit", tls_context=ctx, auth={"surveys@contoso.test": "contoso-pw"}) as own:
        yield sg, mj, own


def example_config(tmp_path: Path, ca: CertAuthority, sg: ThreadedSink, mj: ThreadedSink,
                   own: ThreadedSink, **relay: Any) -> RelayConfig:
    return RelayConfig(
        tmp_path / "relay",
        upstreams={
            "sendgrid": upstream(sg, ca, "starttls", password="env:SENDGRID_API_KEY"),
            "mailjet": upstream(mj, ca, "starttls", pool="b", username="env:MAILJET_API_KEY",
                                password="env:MAILJET_SECRET_KEY"),
        },
        egress_sources={
            "a": {"address": "127.0.0.2", "ehlo": "a.relay.test"},
            "b": {"address": "127.0.0.3", "ehlo": "b.relay.test"},
            "c": {"address": "127.0.0.4", "ehlo": "c.relay.test"},
        },
        egress_pools={"default": ["a"], "b": ["b"], "customer": ["c"]},
        orgs=[
            {"org": "acme", "domains": ["acme.test"], "upstream": "sendgrid"},
            {"org": "eurostudy", "domains": ["eurostudy.test"], "upstream": "mailjet", "enforce": True,
             "members": {"anna@eurostudy.test": {"upstream": "sendgrid"}}},
            {"org": "contoso", "domains": ["contoso.test"], "upstream": "own", "pool": "customer",
             "upstreams": {"own": upstream(own, ca, "implicit", username="surveys@contoso.test",
                                           password="env:CONTOSO_PW",
                                           from_address="surveys@contoso.test")}},
            {"org": "globex", "domains": ["globex.test"], "upstream": "sendgrid",
             "members": {"marie@globex.test": {"upstream": "mailjet"}}},
        ],
        **relay,
    )


def test_each_organisation_reaches_its_upstream_from_its_egress_ip(
    tmp_path: Path, ca: CertAuthority, three_sinks: tuple[ThreadedSink, ThreadedSink, ThreadedSink]
) -> None:
    sg, mj, own = three_sinks
    cfg = example_config(tmp_path, ca, sg, mj, own).write()
    with RelayProcess(cfg, env=SECRETS) as relay:
        reply = send(relay.port, "bob@acme.test", ["r1@customer.test"], headers={"X-Relay-Org": "acme"})
        send(relay.port, "anna@eurostudy.test", ["r2@customer.test"])  # enforced: mailjet, not her sendgrid
        send(relay.port, "nurse@contoso.test", ["r3@customer.test"])
        send(relay.port, "marie@globex.test", ["r4@customer.test"])  # personal choice: mailjet
        send(relay.port, "tom@globex.test", ["r5@customer.test"])  # org default: sendgrid
        sg.wait_for(2, 15)
        mj.wait_for(2, 15)
        own.wait_for(1, 15)
        relay.wait_events("delivered", 5)
    queued = re.fullmatch(r"2\.0\.0 OK: queued as (\S+)", reply)
    assert queued is not None, reply
    assert sorted(m.rcpt_tos[0] for m in sg.messages) == ["r1@customer.test", "r5@customer.test"]
    assert sorted(m.rcpt_tos[0] for m in mj.messages) == ["r2@customer.test", "r4@customer.test"]
    [c] = own.messages
    # Source address, EHLO name and credentials per upstream.
    assert {m.peer_ip for m in sg.messages} == {"127.0.0.2"}
    assert {m.ehlo for m in sg.messages} == {"a.relay.test"}
    assert {m.auth_identity for m in sg.messages} == {"apikey"}
    assert {m.peer_ip for m in mj.messages} == {"127.0.0.3"}
    assert {m.auth_identity for m in mj.messages} == {"mj-user"}
    assert (c.peer_ip, c.auth_identity, c.tls) == ("127.0.0.4", "surveys@contoso.test", True)
    assert c.mail_from == "surveys@contoso.test"  # rewritten to the From the server expects
    assert all(m.tls for m in sg.messages + mj.messages)
    # The trusted tag is removed; our Received header is added.
    acme = next(m for m in sg.messages if m.rcpt_tos == ["r1@customer.test"])
    assert b"X-Relay-Org" not in acme.data
    assert acme.data.startswith(b"Received: from app.test ([127.0.0.1])")
    log = relay.mail_log()
    delivered = {e["recipient"]: e for e in log if e["event"] == "delivered"}
    assert delivered["r1@customer.test"]["queue_id"] == queued.group(1)  # the id we were given
    assert delivered["r3@customer.test"]["upstream"] == "contoso/own"
    assert delivered["r3@customer.test"]["egress"] == "127.0.0.4"
    assert delivered["r2@customer.test"]["org"] == "eurostudy"
    assert all("reply" in e and e["reply"].startswith("250") for e in delivered.values())
    # No secret ever reaches the logs.
    text = (cfg / "mail.log").read_text() + relay.output()
    for secret in SECRETS.values():
        assert secret not in text


def test_temporary_failure_then_success_gives_one_delivery(tmp_path: Path) -> None:
    with ThreadedSink(script=Script(data=["451 4.3.0 try again later"])) as sink:
        cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain").write()
        with RelayProcess(cfg) as relay:
            send(relay.port, "a@x.test", ["b@y.test"])
            sink.wait_for(1, 15)
            deferred = relay.wait_events("deferred", 1)
            relay.wait_events("delivered", 1)
            time.sleep(0.3)
    assert len(sink.messages) == 1
    assert deferred[0]["reply"] == "451 4.3.0 try again later"
    assert sum(s.commands.count("DATA") for s in sink.sessions) == 2  # one refused, one accepted


def test_permanent_failure_bounces_with_a_dsn_quoting_the_upstream(tmp_path: Path) -> None:
    script = Script(rcpt={"gone@y.test": "550 5.1.1 <gone@y.test>: no such user here"})
    with ThreadedSink(script=script) as sink:
        cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain").write()
        with RelayProcess(cfg) as relay:
            send(relay.port, "alice@x.test", ["gone@y.test", "ok@y.test"])
            sink.wait_for(2, 15)
            relay.wait_events("bounced", 1)
            relay.wait_events("delivered", 2)  # ok@y.test and the DSN to alice
    original, dsn = sorted(sink.messages, key=lambda m: m.mail_from == "")
    assert original.rcpt_tos == ["ok@y.test"]
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["alice@x.test"]
    assert b"multipart/report" in dsn.data and b"report-type=delivery-status" in dsn.data
    assert b"550 5.1.1 <gone@y.test>: no such user here" in dsn.data
    assert b"Final-Recipient: rfc822; gone@y.test" in dsn.data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_upstream_down_then_back_gets_everything(tmp_path: Path) -> None:
    port = _free_port()
    cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(port)},
                      default_upstream="plain").write()
    with RelayProcess(cfg) as relay:
        for i in range(5):
            send(relay.port, "a@x.test", [f"r{i}@y.test"])
        relay.wait_events("deferred", 5)
        assert "refused" in relay.events("deferred")[0]["reply"]
        with ThreadedSink(port=port) as sink:
            sink.wait_for(5, 20)
            relay.wait_events("delivered", 5)
    assert sorted(sink.recipients) == [f"r{i}@y.test" for i in range(5)]


def test_client_from_unlisted_network_is_refused_and_nothing_arrives(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain", clients={"networks": ["127.0.0.1/32"]}).write()
        with RelayProcess(cfg) as relay:
            with smtplib.SMTP("127.0.0.1", relay.port, source_address=("127.0.0.66", 0), timeout=10) as s:
                s.ehlo("intruder.test")
                code, text = s.mail("spam@evil.test")
                assert code == 554 and text.startswith(b"5.7.1")
                code, _ = s.rcpt("victim@y.test")
                assert code >= 500
            send(relay.port, "ok@x.test", ["fine@y.test"])  # the allowlisted client still works
            sink.wait_for(1, 15)
            rejected = relay.wait_events("rejected", 1)
    assert [m.rcpt_tos for m in sink.messages] == [["fine@y.test"]]
    assert rejected[0]["client"] == "127.0.0.66"


def test_kill_9_during_a_stream_loses_nothing_acknowledged(tmp_path: Path) -> None:
    port = _free_port()
    cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(port)},
                      default_upstream="plain").write()
    acked: list[str] = []
    with ThreadedSink(port=port) as sink:
        relay = RelayProcess(cfg).start()
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set() and i < 2000:
                try:
                    send(relay.port, "a@x.test", [f"r{i}@y.test"], headers={"Subject": f"msg-{i}"})
                    acked.append(f"msg-{i}")
                except (OSError, smtplib.SMTPException):
                    return
                i += 1

        threads = [threading.Thread(target=stream) for _ in range(1)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while len(acked) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)
        relay.kill9()
        stop.set()
        for t in threads:
            t.join(10)
        assert len(acked) >= 60
        with RelayProcess(cfg) as relay2:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = {m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages}
                if set(acked) <= got:
                    break
                time.sleep(0.1)
            relay2.stop()
    got_list = [m.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages]
    missing = set(acked) - set(got_list)
    assert not missing, f"{len(missing)} acknowledged messages lost: {sorted(missing)[:10]}"
    duplicates = len(got_list) - len(set(got_list))
    print(f"acknowledged {len(acked)}, delivered {len(got_list)}, duplicates {duplicates}")


def test_smuggling_with_bare_line_endings_never_yields_a_second_message(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain").write()
        with RelayProcess(cfg) as relay:
            for end in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"):
                with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as s:
                    f = s.makefile("rb")
                    f.readline()
                    s.sendall(b"EHLO app.test\r\n")
                    while f.readline()[3:4] == b"-":
                        pass
                    s.sendall(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n")
                    for _ in range(3):
                        f.readline()
                    s.sendall(b"Subject: first\r\n\r\nhello" + end
                              + b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
                              + b"Subject: smuggled\r\n\r\nsmuggled" + end + b"\r\n.\r\n")
                    reply = f.readline()
                    # Bare CR/LF in DATA is refused outright (Postfix's smtpd_forbid_bare_newline).
                    assert reply.startswith(b"554 5.6.0"), (end, reply)
                    s.sendall(b"QUIT\r\n")
            # A clean message afterwards is the synchronisation point: once it is delivered,
            # anything smuggled would have been delivered too.
            send(relay.port, "a@x.test", ["after@y.test"])
            sink.wait_for(1, 15)
            relay.wait_events("delivered", 1)
    assert [m.rcpt_tos for m in sink.messages] == [["after@y.test"]]
