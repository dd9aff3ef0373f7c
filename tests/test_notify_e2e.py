"""Issue 13 end to end: real `relay serve`, real SMTP sinks, a real HTTPS webhook receiver
that verifies signatures (tests/webhookrecv.py), real redis-server for shared suppression."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.certs import CertAuthority
from tests.redisproc import RedisServer
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink
from tests.webhookrecv import WebhookReceiver, assert_no_gaps

SECRET = "whsec-5d1c9e7a0b44"
HOOK_ENV = {**ENV, "HOOK_SECRET": SECRET}


def hook(rx: WebhookReceiver, ca: CertAuthority, **extra: Any) -> dict[str, Any]:
    return {"url": rx.url, "secret": "env:HOOK_SECRET", "ca_file": ca.ca_file,
            "retry_initial": "100ms", "retry_max": "500ms", **extra}


def qid_of(reply: str) -> str:
    return reply.rsplit(" ", 1)[-1].strip("[]")


def test_events_reach_the_webhook_signed_after_failed_calls_with_every_field(
        tmp_path: Path, ca: CertAuthority) -> None:
    with ThreadedSink() as sink, WebhookReceiver(ca, secret=SECRET, fail_first=2) as rx:
        cfg = relay_with_admin(
            tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
            default_upstream="plain", webhooks={"platform": hook(rx, ca)})
        with RelayProcess(cfg.write(), env=HOOK_ENV) as relay:
            qids = [qid_of(send(relay.port, "app@acme.test", [f"r{i}@x.test"],
                                headers={"Message-ID": f"<m{i}@acme.test>"})) for i in range(3)]
            sink.wait_for(3)
            evs = rx.wait_for(lambda e: len([x for x in e if x["type"] == "delivered"]) >= 3)
            status, outbox, _ = http("GET", admin_url(relay) + "/events/outbox")
        out = relay.output()
    assert rx.failed_calls == 2 and rx.bad_signatures == 0
    assert_no_gaps(evs)
    assert len({e["id"] for e in evs}) == len({(e["stream"], e["seq"]) for e in evs})
    received = {e["queue_id"]: e for e in evs if e["type"] == "received"}
    assert set(received) == set(qids)
    r0 = received[qids[0]]
    assert r0["message_id"] == "m0@acme.test" and r0["sender"] == "app@acme.test"
    assert r0["listener"] == "smtp" and r0["recipients"] == ["r0@x.test"]
    assert r0["upstream"] == "plain" and r0["routed_by"] == "global default upstream"
    d = next(e for e in evs if e["type"] == "delivered" and e["queue_id"] == qids[1])
    assert d["recipient"] == "r1@x.test" and d["message_id"] == "m1@acme.test"
    assert d["upstream"] == "plain" and d["egress"] == "127.0.0.2" and d["attempt"] == 1
    assert d["reply"]["code"] == 250 and d["org"] == "default"
    assert status == 200
    [ep] = outbox["endpoints"]
    assert ep["endpoint"] == "platform" and ep["depth"] == 0 and ep["last_error"] == "HTTP 503: try later"
    assert SECRET not in out and SECRET not in (tmp_path / "r" / "mail.log").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_with_the_receiver_down_then_every_event_arrives_without_gaps(
        tmp_path: Path, ca: CertAuthority, workers: int) -> None:
    n = 24
    with ThreadedSink() as sink, WebhookReceiver(ca, secret=SECRET) as rx:
        rx.down = True
        cfg = relay_with_admin(
            tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
            default_upstream="plain", workers=workers, webhooks={"platform": hook(rx, ca)})
        relay = RelayProcess(cfg.write(), env=HOOK_ENV).start()
        try:
            for i in range(n):
                send(relay.port, "app@acme.test", [f"r{i}@x.test"])
            sink.wait_for(n, within=20)
            relay.wait_events("delivered", n)
            # The outbox holds every event (the receiver refuses them all), then kill -9.
            status, outbox, _ = http("GET", admin_url(relay) + "/events/outbox")
            assert status == 200
            assert sum(e["depth"] for e in outbox["endpoints"]) >= 2 * n - 4
            deadline = time.monotonic() + 10
            while rx.calls == 0:  # the endpoint has been tried (and refused)
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert not rx.snapshot()
            relay.kill9()
            rx.down = False
            relay.start()
            evs = rx.wait_for(lambda e: len({x["id"] for x in e}) >= 2 * n, timeout=30)
        finally:
            relay.stop()
    last = assert_no_gaps(evs)
    assert all(min(e["seq"] for e in evs if e["stream"] == s) == 1 for s in last)
    kinds = [e["type"] for e in {e["id"]: e for e in evs}.values()]
    assert kinds.count("received") == n and kinds.count("delivered") == n
    if workers == 2:
        assert {s.rsplit("/", 1)[1] for s in last} <= {"w0", "w1"}


def test_a_refused_dsn_sender_still_reaches_the_sender_and_the_platform(
        tmp_path: Path, ca: CertAuthority) -> None:
    refuse_null = Script(rcpt={"gone@x.test": "550 5.1.1 No such user"},
                         mail={"": "550 5.7.1 Sender address not allowed"})
    with ThreadedSink(script=refuse_null) as customer, ThreadedSink() as platform, \
            WebhookReceiver(ca, secret=SECRET) as rx:
        orgs = [
            {"org": "acme", "domains": ["acme.test"], "upstream": "own",
             "upstreams": {"own": plain_upstream(customer.port)}},
            # beta asks for its DSNs to go through its own server, which refuses them.
            {"org": "beta", "domains": ["beta.test"], "upstream": "own",
             "upstreams": {"own": plain_upstream(customer.port)},
             "dsn": {"upstream": "own"}},
        ]
        cfg = RelayConfig(tmp_path / "r", upstreams={"platform": plain_upstream(platform.port)},
                          default_upstream="platform", orgs=orgs,
                          webhooks={"platform": hook(rx, ca)})
        with RelayProcess(cfg.write(), env=HOOK_ENV) as relay:
            a = qid_of(send(relay.port, "app@acme.test", ["gone@x.test"]))
            b = qid_of(send(relay.port, "app@beta.test", ["gone@x.test"]))
            platform.wait_for(1)
            evs = rx.wait_for(lambda e: {"dsn_failed"} <= {x["type"] for x in e}
                              and len([x for x in e if x["type"] == "bounced"]) >= 2)
            evs = rx.wait_for(lambda e: any(x["type"] == "delivered" and x.get("dsn")
                                            for x in e))
        out = relay.output()
    dsn = platform.messages[0]
    assert dsn.mail_from == "" and dsn.rcpt_tos == ["app@acme.test"]
    assert b"550 5.1.1 No such user" in dsn.data and a.encode() in dsn.data
    assert all(m.mail_from for m in customer.messages)  # no DSN ever reached the customer
    bounced = {e["queue_id"]: e for e in evs if e["type"] == "bounced"}
    assert bounced[a]["reply"] == {"code": 550, "enhanced": "5.1.1", "text": "5.1.1 No such user"}
    assert bounced[a]["class"] == "hard" and bounced[a]["upstream"] == "acme/own"
    queued = {e["queue_id"]: e for e in evs if e["type"] == "dsn_queued"}
    assert queued[a]["upstream"] == "platform" and queued[b]["upstream"] == "beta/own"
    failed = next(e for e in evs if e["type"] == "dsn_failed")
    assert failed["queue_id"] == queued[b]["dsn_queue_id"] and failed["recipient"] == "app@beta.test"
    assert failed["reply"]["text"].startswith("5.7.1 Sender address not allowed")
    assert "could not be delivered" in out


def test_trace_of_a_message_deferred_twice_then_delivered(tmp_path: Path,
                                                          ca: CertAuthority) -> None:
    script = Script(data=["451 4.3.0 try later", "451 4.3.0 try later"])
    with ThreadedSink(script=script) as sink, WebhookReceiver(ca, secret=SECRET) as rx:
        cfg = relay_with_admin(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                               default_upstream="plain", webhooks={"platform": hook(rx, ca)})
        with RelayProcess(cfg.write(), env=HOOK_ENV) as relay:
            qid = qid_of(send(relay.port, "app@acme.test", ["ann@x.test"],
                              headers={"Message-ID": "<t1@acme.test>"}))
            sink.wait_for(1, within=20)
            rx.wait_for(lambda e: any(x["type"] == "delivered" for x in e))
            url = admin_url(relay)
            status, by_mid, _ = http("GET", url + "/trace?q=t1@acme.test")
            cli = subprocess.run(
                [sys.executable, "-m", "relay.cli", "trace", "--url", url, qid],
                capture_output=True, text=True, env={**HOOK_ENV, "PATH": "/usr/bin:/bin"},
                timeout=30)
            status_r, by_rcpt, _ = http("GET", url + "/trace?q=ann@x.test")
            unknown = subprocess.run(
                [sys.executable, "-m", "relay.cli", "trace", "--url", url, "nobody@x.test"],
                capture_output=True, text=True, env={**HOOK_ENV, "PATH": "/usr/bin:/bin"},
                timeout=30)
    assert status == 200 and status_r == 200
    assert unknown.returncode == 1 and "nothing known about nobody@x.test" in unknown.stdout
    [t] = by_mid["messages"]
    assert by_rcpt["messages"][0]["queue_id"] == qid == t["queue_id"]
    assert t["received"]["listener"] == "smtp" and t["received"]["client"] == "127.0.0.1"
    assert t["received"]["attributed_by"] and t["received"]["routed_by"]
    assert [(a["type"], a["attempt"]) for a in t["attempts"]] == [
        ("deferred", 1), ("deferred", 2), ("delivered", 3)]
    for a in t["attempts"]:
        assert a["upstream"] == "plain" and a["egress"] == "127.0.0.2"
    assert t["attempts"][0]["reply"]["text"] == "4.3.0 try later"
    assert t["attempts"][0]["class"] == "soft" and t["attempts"][0]["next_attempt"]
    assert t["recipients"] == {"ann@x.test": {"status": "delivered", "ts": t["attempts"][2]["ts"],
                                              "reply": t["attempts"][2]["reply"], "class": None}}
    assert all(e["webhooks"]["sent"] == ["platform"] for e in t["events"])
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.count("deferred") == 2 and "final ann@x.test: delivered" in cli.stdout


def _refused(port: int, sender: str, rcpt: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("app.test")
        s.mail(sender)
        code, text = s.rcpt(rcpt)
        return code, text.decode()


SUPPRESSING = {"org": "acme", "domains": ["acme.test"],
               "suppression": {"enabled": True, "classes": ["hard"], "duration": "30d"}}


def test_a_hard_bounce_suppresses_the_recipient_across_a_restart(tmp_path: Path) -> None:
    script = Script(rcpt={"gone@x.test": "550 5.1.1 No such user"})
    with ThreadedSink(script=script) as sink:
        cfg = RelayConfig(tmp_path / "r", upstreams={"plain": plain_upstream(sink.port)},
                          default_upstream="plain", orgs=[SUPPRESSING, {"org": "other",
                                                                        "domains": ["o.test"]}])
        relay = RelayProcess(cfg.write()).start()
        try:
            send(relay.port, "app@acme.test", ["gone@x.test"])
            relay.wait_events("bounced", 1)
            deadline = time.monotonic() + 10
            while (code := _refused(relay.port, "app@acme.test", "gone@x.test"))[0] != 550:
                assert time.monotonic() < deadline, code
                time.sleep(0.1)
            relay.stop()
            relay.start()
            code, text = _refused(relay.port, "app@acme.test", "gone@x.test")
            other = _refused(relay.port, "x@o.test", "gone@x.test")  # another organisation
        finally:
            relay.stop()
    assert code == 550 and text.startswith("5.1.1 <gone@x.test> is suppressed for organisation acme since")
    assert "hard bounce: 550 5.1.1 No such user" in text and ", until " in text
    assert other[0] == 250
    rejected = [e for e in relay.events("rejected") if e.get("reason") == "suppressed"]
    assert len(rejected) >= 2


def test_suppression_is_shared_by_two_nodes_through_redis(tmp_path: Path,
                                                          redis_server: RedisServer) -> None:
    script = Script(rcpt={"gone@x.test": "550 5.1.1 No such user"})
    limits = {"backend": "redis", "redis_url": redis_server.url, "slow_down_initial": "0.5s"}
    with ThreadedSink(script=script) as sink:
        nodes = []
        for name in ("a", "b"):
            cfg = relay_with_admin(tmp_path / name, upstreams={"plain": plain_upstream(sink.port)},
                                   default_upstream="plain", orgs=[SUPPRESSING],
                                   limits={**limits, "node_id": name})
            nodes.append(RelayProcess(cfg.write(), env=ENV).start())
        a, b = nodes
        try:
            send(a.port, "app@acme.test", ["gone@x.test"])
            a.wait_events("bounced", 1)
            deadline = time.monotonic() + 10
            while (code := _refused(b.port, "app@acme.test", "gone@x.test"))[0] != 550:
                assert time.monotonic() < deadline, code
                time.sleep(0.1)
            # An operator removes it on node b: node a accepts the recipient again.
            st, _, _ = http("DELETE", admin_url(b) + "/suppression/acme/gone@x.test")
            deadline = time.monotonic() + 10
            while _refused(a.port, "app@acme.test", "gone@x.test")[0] != 250:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            st2, listed, _ = http("GET", admin_url(a) + "/suppression?org=acme")
        finally:
            for n in nodes:
                n.stop()
    assert code[1].startswith("5.1.1 <gone@x.test> is suppressed") and st == 200
    assert st2 == 200 and listed["entries"] == []


def test_suppression_cli_adds_lists_exports_and_removes(tmp_path: Path) -> None:
    cfg = relay_with_admin(tmp_path / "r", upstreams={"plain": plain_upstream(9)},
                           default_upstream="plain", orgs=[SUPPRESSING])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay.cli", "suppression", *args,
                               "--url", url], capture_output=True, text=True, env=ENV | {
                                   "PATH": "/usr/bin:/bin"}, timeout=30)

    with RelayProcess(cfg.write(), env=ENV) as relay:
        url = admin_url(relay)
        added = cli("add", "--org", "acme", "--recipient", "Ann@X.test", "--reason",
                    "asked to stop", "--duration", "7d")
        refused = _refused(relay.port, "app@acme.test", "ann@x.test")
        listed = cli("list", "--org", "acme")
        exported = cli("export")
        removed = cli("remove", "--org", "acme", "--recipient", "ann@x.test")
        again = cli("remove", "--org", "acme", "--recipient", "ann@x.test")
        bad = cli("add", "--org", "nope", "--recipient", "a@b.test")
        accepted = _refused(relay.port, "app@acme.test", "ann@x.test")
    assert added.returncode == 0, added.stderr
    assert refused[0] == 550 and "asked to stop" in refused[1]
    assert "ann@x.test" in listed.stdout and "asked to stop" in listed.stdout
    assert exported.stdout.splitlines()[0].startswith("org,recipient,class")
    assert "acme,ann@x.test,manual,asked to stop" in exported.stdout
    assert removed.returncode == 0 and again.returncode == 1 and "not suppressed" in again.stderr
    assert bad.returncode == 1 and "configured organisation" in bad.stderr
    assert accepted[0] == 250
    assert json.loads(json.dumps(refused))  # plain values
