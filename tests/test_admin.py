"""The admin API over real HTTP against a real `relay serve`: token required (and compared),
open health/metrics endpoints, egress IPs, queue views and actions that the scheduler obeys,
reload with errors, and test connection."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adminapi import ENV, TOKEN, admin_url, http, relay_with_admin
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink


def defer_some(rcpt: str) -> str | None:
    return "451 4.3.0 mailbox busy, try later" if rcpt.endswith("@defer.test") else None


@pytest.fixture
def sink() -> Iterator[ThreadedSink]:
    with ThreadedSink(script=Script(rcpt_fn=defer_some)) as s:
        yield s


def config(tmp_path: Path, sink: ThreadedSink, **kw: Any) -> RelayConfig:
    return relay_with_admin(
        tmp_path / "relay",
        upstreams={"plain": plain_upstream(sink.port)},
        default_upstream="plain",
        retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"},
        orgs=[{"org": "acme", "domains": ["acme.test"]}, {"org": "globex", "domains": ["globex.test"]}],
        **kw,
    )


@pytest.fixture
def relay(tmp_path: Path, sink: ThreadedSink) -> Iterator[tuple[RelayProcess, str, RelayConfig]]:
    cfg = config(tmp_path, sink)
    with RelayProcess(cfg.write(), env=ENV) as r:
        yield r, admin_url(r), cfg


def test_token_required_and_compared(relay: tuple[RelayProcess, str, RelayConfig]) -> None:
    _, url, _ = relay
    for path in ("/healthz", "/readyz", "/metrics"):
        status, _, _ = http("GET", url + path, token=None)
        assert status == 200, path
    status, body, headers = http("GET", url + "/queue", token=None)
    assert status == 401 and "token" in body["error"]
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert http("GET", url + "/queue", token="wrong-token")[0] == 401
    assert http("GET", url + "/queue", token=TOKEN + "x")[0] == 401
    assert http("POST", url + "/reload", token="wrong-token")[0] == 401
    assert http("POST", url + "/queue/actions", {"action": "delete", "all": True}, token=None)[0] == 401
    status, body, _ = http("GET", url + "/queue")
    assert status == 200 and body["messages"] == 0
    status, body, _ = http("GET", url + "/readyz", token=None)
    assert body["ready"] is True and body["listeners"]["smtp"] > 0


def test_without_a_token_only_open_endpoints(tmp_path: Path, sink: ThreadedSink) -> None:
    cfg = config(tmp_path, sink, admin={"enabled": True, "address": "127.0.0.1", "port": 0})
    with RelayProcess(cfg.write()) as r:
        url = admin_url(r)
        assert http("GET", url + "/healthz", token=None)[0] == 200
        status, body, _ = http("GET", url + "/queue", token="anything")
        assert status == 403
        assert "no token configured" in body["error"] and "/metrics" in body["error"]


def test_egress_ips_json_and_text(relay: tuple[RelayProcess, str, RelayConfig]) -> None:
    _, url, _ = relay
    status, body, _ = http("GET", url + "/egress-ips")
    assert status == 200 and body["addresses"] == ["127.0.0.2", "127.0.0.3"]
    assert body["pools"]["b"] == [{"name": "b", "address": "127.0.0.3", "ehlo": "b.relay.test"}]
    status, text, _ = http("GET", url + "/egress-ips?format=text")
    assert text.splitlines()[0] == "127.0.0.2\ta.relay.test\tdefault"
    status, text, _ = http("GET", url + "/egress-ips", headers={"Accept": "text/plain"})
    assert "127.0.0.3\tb.relay.test\tb" in text
    assert http("GET", url + "/egress-ips?format=spf&pool=b")[1].strip() == "ip4:127.0.0.3"
    assert http("GET", url + "/egress-ips?pool=nope")[0] == 404


def queue_id(reply: str) -> str:
    return reply.split()[-1]


def test_queue_views_actions_and_metrics(relay: tuple[RelayProcess, str, RelayConfig],
                                         sink: ThreadedSink) -> None:
    r, url, _ = relay
    q1 = queue_id(send(r.port, "a@acme.test", ["x@defer.test"]))
    q2 = queue_id(send(r.port, "b@acme.test", ["y@defer.test", "ok@example.org"]))
    q3 = queue_id(send(r.port, "c@globex.test", ["z@defer.test"]))
    r.wait_events("deferred", 3)
    # ok@example.org delivered (its mail-log line comes once the spool has recorded it);
    # its two siblings wait an hour.
    r.wait_events("delivered", 1)
    sink.wait_for(1)

    status, s, _ = http("GET", url + "/queue")
    assert (s["messages"], s["recipients_pending"]) == (3, 3)
    assert s["by_org"]["acme"]["messages"] == 2 and s["by_upstream"]["plain"]["messages"] == 3
    status, body, _ = http("GET", url + "/queue/messages?org=acme")
    assert [m["queue_id"] for m in body["messages"]] == [q1, q2]
    assert body["messages"][1]["pending"] == ["y@defer.test"]
    assert body["messages"][0]["last_reply"] == "451 4.3.0 mailbox busy, try later"
    assert http("GET", url + "/queue/messages?older_than=1h")[1]["count"] == 0
    assert http("GET", url + "/queue/messages?older_than=bogus")[0] == 400

    status, shown, _ = http("GET", url + f"/queue/messages/{q2}")
    assert shown["scheduler"]["state"] == "waiting"
    assert {x["recipient"]: x["status"] for x in shown["recipients"]} == {
        "y@defer.test": "pending", "ok@example.org": "delivered"}
    assert "Subject: test" in shown["headers"]
    assert http("GET", url + "/queue/messages/NOPE")[0] == 404

    # Metrics at scrape time: depth and age by upstream, outcomes by upstream and org.
    metrics = http("GET", url + "/metrics", token=None)[1]
    assert 'relay_queue_messages{upstream="plain"} 3.0' in metrics
    assert 'relay_queue_oldest_age_seconds{upstream="plain"}' in metrics
    assert 'relay_recipients_total{disposition="deferred",org="acme",upstream="plain"} 2.0' in metrics
    assert 'relay_received_messages_total{org="globex"} 1.0' in metrics
    assert "relay_delivery_seconds_bucket" in metrics

    # Hold: a retry is refused and nothing is attempted; release dispatches it at once.
    assert http("POST", url + f"/queue/messages/{q1}/hold")[1]["result"] == "ok"
    status, body, _ = http("POST", url + f"/queue/messages/{q1}/retry")
    assert status == 409 and "held" in body["text"]
    assert http("GET", url + f"/queue/messages/{q1}")[1]["held"] is True
    assert http("POST", url + f"/queue/messages/{q1}/release")[1]["result"] == "ok"
    r.wait_events("deferred", 4)
    assert [e["attempt"] for e in r.events("deferred") if e["queue_id"] == q1] == [1, 2]

    # Retry now (bulk, by filter): globex's message is attempted again.
    status, body, _ = http("POST", url + "/queue/actions", {"action": "retry", "org": "globex"})
    assert (status, body["matched"], body["counts"]) == (200, 1, {"ok": 1})
    r.wait_events("deferred", 5)
    assert [e["attempt"] for e in r.events("deferred") if e["queue_id"] == q3] == [1, 2]
    assert http("POST", url + "/queue/actions", {"action": "delete"})[0] == 400  # no filter

    # Bounce: a DSN to the sender, who is deliverable.
    status, body, _ = http("POST", url + f"/queue/messages/{q2}/bounce", {"reason": "test bounce"})
    assert status == 200 and "DSN" in body["text"]
    sink.wait_for(2)
    dsn = sink.messages[-1]
    assert dsn.rcpt_tos == ["b@acme.test"] and dsn.mail_from == ""
    assert b"test bounce" in dsn.data
    # Delete: gone from the queue and the spool.
    assert http("DELETE", url + f"/queue/messages/{q3}")[1]["result"] == "ok"
    assert http("DELETE", url + f"/queue/messages/{q3}")[0] == 404
    left = http("GET", url + "/queue/messages")[1]["messages"]
    assert [m["queue_id"] for m in left] == [q1]


def test_held_message_stays_held_across_restart(tmp_path: Path, sink: ThreadedSink) -> None:
    cfg = config(tmp_path, sink).write()
    with RelayProcess(cfg, env=ENV) as r:
        q = queue_id(send(r.port, "a@acme.test", ["x@defer.test"]))
        r.wait_events("deferred", 1)
        assert http("POST", admin_url(r) + f"/queue/messages/{q}/hold")[0] == 200
    with RelayProcess(cfg, env=ENV) as r:
        shown = http("GET", admin_url(r) + f"/queue/messages/{q}")[1]
        assert shown["held"] is True and shown["scheduler"]["state"] == "held"


def test_reload_over_the_api(relay: tuple[RelayProcess, str, RelayConfig]) -> None:
    r, url, cfg = relay
    cfg.doc["retry"] = {"schedule": ["2h"], "jitter": 0, "max_age": "1d"}
    cfg.write()
    status, body, _ = http("POST", url + "/reload")
    assert (status, body["reloaded"]) == (200, True)
    (cfg.dir / "policies" / "acme.yaml").write_text("org: acme\ndomains: [acme.test]\nupstream: nowhere\n")
    status, body, _ = http("POST", url + "/reload")
    assert status == 422 and body["reloaded"] is False
    [err] = body["errors"]
    assert err.endswith("acme.yaml:3: upstream 'nowhere' is not defined (neither in this"
                        " organisation's upstreams nor globally)")
    # The log line is read from the relay's stderr by a thread: it may trail the HTTP answer.
    deadline = time.monotonic() + 5
    while not any("reload refused" in line and "acme.yaml:3:" in line for line in r.stderr):
        assert time.monotonic() < deadline, r.output()
        time.sleep(0.05)
    # Still serving with the old configuration.
    send(r.port, "a@acme.test", ["ok@example.org"])


def test_test_upstream_over_the_api(relay: tuple[RelayProcess, str, RelayConfig],
                                    sink: ThreadedSink) -> None:
    _, url, _ = relay
    status, body, _ = http("POST", url + "/test-upstream", {"upstream": "plain", "rcpt_to": "p@example.org"})
    assert status == 200 and body["ok"] is True
    [rep] = body["reports"]
    assert rep["source_address"] == "127.0.0.2"
    assert [s["name"] for s in rep["steps"]][-3:] == ["RCPT TO:<p@example.org>", "RSET", "QUIT"]
    assert sink.sessions[-1].peer_ip == "127.0.0.2"
    # Ad hoc, from a named source; the password only as a reference.
    status, body, _ = http("POST", url + "/test-upstream", {
        "host": "127.0.0.1", "port": sink.port, "tls": "none", "allow_plaintext": True,
        "source": "b", "rcpt_to": "x@defer.test", "timeout": 5})
    assert status == 200 and body["ok"] is False
    step = body["reports"][0]["steps"][-1]
    assert (step["name"], step["reply"]) == ("RCPT", "451 4.3.0 mailbox busy, try later")
    assert sink.sessions[-1].peer_ip == "127.0.0.3"
    status, body, _ = http("POST", url + "/test-upstream", {
        "host": "127.0.0.1", "port": 2525, "tls": "starttls", "password": "hunter2"})
    assert status == 400 and "reference" in body["error"] and "hunter2" not in body["error"]
    assert http("POST", url + "/test-upstream", {"upstream": "nope"})[0] == 400


def test_openapi_documents_every_route() -> None:
    import yaml

    from relay.ops.admin import AdminApi

    doc = yaml.safe_load((Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml").read_text())
    app = AdminApi(None, None).app()  # type: ignore[arg-type]  # routes only, no requests
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops
                  if method in ("get", "post", "delete")}
    assert routes == documented
