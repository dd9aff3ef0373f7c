"""auth: xoauth2 through the real `relay serve` (workers, reload, admin API) against a real
HTTPS identity provider (tests/idp.py) and an SMTP sink that takes only valid tokens for the
right mailbox (Exchange Online's AUTH behaviour)."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.certs import CertAuthority
from tests.idp import IdentityProvider
from tests.redisproc import RedisServer
from tests.relayproc import RelayProcess
from tests.sinks import ThreadedSink

MAILBOX = "surveys@contoso.test"
SECRET = "entra-client-secret-value-1"


@pytest.fixture
def idp(ca: CertAuthority) -> Iterator[IdentityProvider]:
    with IdentityProvider(ca) as server:
        server.add_app("client-1", secret=SECRET, mailboxes={MAILBOX})
        yield server


def exchange(idp: IdentityProvider) -> ThreadedSink:
    def check(user: str, token: str) -> str | None:
        return None if idp.valid(token, user) else "535 5.7.3 Authentication unsuccessful"

    return ThreadedSink(oauth=check, auth_require_tls=False,
                        plain_reply="535 5.7.139 Authentication unsuccessful, basic"
                        " authentication is disabled.")


def contoso(sink_port: int, idp: IdentityProvider, ca: CertAuthority, **up: Any) -> dict[str, Any]:
    """The organisation file an admin writes: one upstream, provider microsoft365, app-only."""
    upstream = {
        "provider": "microsoft365",
        "host": "mx.test", "port": sink_port, "tls": "none", "allow_plaintext": True,
        "auth": "xoauth2",
        "username": MAILBOX,
        "oauth": {"tenant": "tenant-1", "client_id": "client-1",
                  "client_secret": "env:ENTRA_SECRET",
                  "token_endpoint": idp.endpoint("tenant-1"), "ca_file": ca.ca_file},
        # the profile's 30 a minute and 3 connections would make this test take minutes
        "throttle": {"quotas": [], "daily": None, "max_connections": 10},
        **up,
    }
    return {"org": "contoso", "domains": ["contoso.test"], "upstream": "m365",
            "upstreams": {"m365": upstream}}


def send_many(port: int, connections: int, per_connection: int) -> int:
    sent = 0
    lock = threading.Lock()

    def one(c: int) -> None:
        nonlocal sent
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            for i in range(per_connection):
                s.sendmail("app@contoso.test", [f"r{c}-{i}@example.test"],
                           b"Subject: invitation\r\n\r\nPlease answer our survey.\r\n")
                with lock:
                    sent += 1

    threads = [threading.Thread(target=one, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return sent


def test_200_messages_over_20_connections_with_two_workers_make_one_token_request(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority
) -> None:
    with exchange(idp) as sink:
        cfg = relay_with_admin(tmp_path / "relay", workers=2,
                               orgs=[contoso(sink.port, idp, ca)]).write()
        env = {**ENV, "ENTRA_SECRET": SECRET}
        with RelayProcess(cfg, env=env) as relay:
            assert send_many(relay.port, 20, 10) == 200
            sink.wait_for(200, within=60)
            relay.wait_events("delivered", 200, timeout=30)
            assert relay.events("bounced") == []
            log = (cfg / "mail.log").read_text() + relay.output()
        tokens = list(idp.issued)
    assert idp.token_requests == 1, idp.grants  # two workers, one token lifetime: one request
    assert {m.auth_identity for m in sink.messages} == {MAILBOX}
    assert len({m.session for m in sink.messages}) > 2  # many connections, one token
    assert tokens and all(t not in log for t in tokens) and SECRET not in log
    assert list((cfg / "spool" / "oauth").glob("*.token"))  # shared between the workers


def test_a_token_expiring_mid_stream_is_refreshed_once_and_nothing_bounces(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority
) -> None:
    with exchange(idp) as sink:
        cfg = relay_with_admin(tmp_path / "relay",
                               orgs=[contoso(sink.port, idp, ca,
                                             throttle={"quotas": [], "daily": None,
                                                       "max_connections": 4,
                                                       "max_messages_per_connection": 5})]
                               ).write()
        with RelayProcess(cfg, env={**ENV, "ENTRA_SECRET": SECRET}) as relay:
            assert send_many(relay.port, 2, 10) == 20
            sink.wait_for(20, within=30)
            idp.expire_all()  # the server stops taking the token the relay still believes in
            assert send_many(relay.port, 2, 10) == 20
            sink.wait_for(40, within=30)
            relay.wait_events("delivered", 40)
            assert relay.events("bounced") == [] and relay.events("deferred") == []
    assert idp.token_requests == 2  # the first token, and one refresh for all connections


def test_a_revoked_secret_pauses_the_upstream_bounces_nothing_and_a_reload_resumes(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority
) -> None:
    secret_file = tmp_path / "entra-secret"
    secret_file.write_text(SECRET)
    with exchange(idp) as sink:
        org = contoso(sink.port, idp, ca)
        org["upstreams"]["m365"]["oauth"]["client_secret"] = f"file:{secret_file}"
        cfg = relay_with_admin(tmp_path / "relay", orgs=[org]).write()
        with RelayProcess(cfg, env=ENV) as relay:
            idp.revoke_secret("client-1")  # the customer deleted the app's secret in Entra
            assert send_many(relay.port, 1, 5) == 5
            relay.wait_events("deferred", 1)
            time.sleep(0.5)
            deferred = relay.events("deferred")
            time.sleep(1.5)  # retry.schedule is 1s: a paused upstream must not retry
            url = admin_url(relay)
            status, summary, _ = http("GET", url + "/queue")
            assert status == 200 and summary["messages"] == 5
            paused = summary["paused_upstreams"]["contoso/m365"]
            assert paused["kind"] == "auth" and "AADSTS7000215" in paused["reason"]
            assert "Certificates & secrets" in paused["next_step"]
            shown = subprocess.run(
                [sys.executable, "-m", "relay.cli", "queue", "-c", str(cfg), "--url", url],
                capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
            assert shown.returncode == 0, shown.stderr
            assert "PAUSED contoso/m365 (auth, until fixed" in shown.stdout
            assert "AADSTS7000215" in shown.stdout and "next step: the client secret" in shown.stdout
            status, events, _ = http("GET", url + "/events?type=deferred")
            assert status == 200 and events["events"], events
            assert {e["class"] for e in events["events"]} == {"auth"}  # the platform hears why
            assert all(e["attempt"] == 0 for e in events["events"])  # and that none was counted
            status, shown, _ = http("GET", url + "/queue/messages")
            replies = [m["last_reply"] for m in shown["messages"] if m.get("last_reply")]
            assert replies and all("AADSTS7000215" in r for r in replies)  # those tried say why
            status, page, _ = http("GET", url + "/status.json")
            [st] = [u for u in page["upstreams"] if u["id"] == "contoso/m365"]
            assert st["state"] == "paused" and "AADSTS7000215" in st["reason"]
            status, metrics, _ = http("GET", url + "/metrics", token=None)
            assert 'relay_upstream_paused{kind="auth",upstream="contoso/m365"} 1.0' in metrics
            assert idp.token_requests == 1, "\n".join(relay.stderr)  # one try, not one per message or per retry
            # the deliveries already under way when the refusal came say so; then none more
            assert relay.events("deferred") == deferred and len(deferred) <= 5
            assert all(d["paused"] == "auth" for d in deferred)
            assert relay.events("bounced") == [] and not sink.messages
            # the admin puts the new secret in place and reloads
            fresh = "entra-client-secret-value-2"
            idp.apps["client-1"].secret = fresh
            secret_file.write_text(fresh)
            status, body, _ = http("POST", url + "/reload")
            assert status == 200, body
            sink.wait_for(5, within=15)
            relay.wait_events("delivered", 5)
            deadline = time.monotonic() + 10
            while (summary := http("GET", url + "/queue")[1])["messages"] and time.monotonic() < deadline:
                time.sleep(0.05)  # outcomes are committed just after the delivered lines
            assert summary["paused_upstreams"] == {} and summary["messages"] == 0
            assert fresh not in relay.output() and SECRET not in relay.output()
    assert relay.events("bounced") == []


@pytest.mark.parametrize(("workers", "where"), [(2, "--api"), (1, "here")])
def test_missing_consent_pauses_every_worker_and_a_successful_test_resumes_them(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority, workers: int, where: str
) -> None:
    """`relay test-upstream NAME --api` tests inside the relay; without --api the test runs
    here and then tells the running relay (its admin API) that the upstream works."""
    idp.apps["client-1"].consented = False  # the customer's admin has not granted consent yet
    with exchange(idp) as sink:
        cfg = relay_with_admin(tmp_path / "relay", workers=workers,
                               orgs=[contoso(sink.port, idp, ca)]).write()
        env = {**ENV, "ENTRA_SECRET": SECRET}
        with RelayProcess(cfg, env=env) as relay:
            assert send_many(relay.port, 4, 3) == 12
            relay.wait_events("deferred", 1)
            url = admin_url(relay)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, body, _ = http("GET", url + "/upstreams")
                paused = body["upstreams"]["contoso/m365"]["paused"]
                if paused is not None:
                    break
                time.sleep(0.05)
            assert paused["kind"] == "auth" and "AADSTS65001" in paused["reason"]
            assert "admin consent" in paused["next_step"]
            assert not sink.messages and relay.events("bounced") == []
            idp.apps["client-1"].consented = True  # consent granted in Entra; nothing reloaded
            out = subprocess.run(
                [sys.executable, "-m", "relay.cli", "test-upstream", "contoso/m365",
                 *(["--api"] if where == "--api" else []), "-c", str(cfg), "--url", url],
                capture_output=True, text=True, timeout=60, env={**os.environ, **env})
            assert out.returncode == 0, out.stdout + out.stderr
            if where == "here":
                assert "was holding contoso/m365's mail (paused); it goes now" in out.stderr
            assert "token: https://127.0.0.1:" in out.stdout and "valid 3600s" in out.stdout
            assert "AUTH XOAUTH2: 235" in out.stdout
            try:
                sink.wait_for(12, within=20)  # both workers resumed, not after their 5-minute look
            except TimeoutError:
                raise AssertionError(f"{len(sink.messages)} delivered; {out.stdout}\n{relay.output()}") from None
            relay.wait_events("delivered", 12)
            status, body, _ = http("GET", url + "/upstreams")
            assert status == 200 and body["upstreams"]["contoso/m365"]["paused"] is None
    assert relay.events("bounced") == []


def test_two_nodes_sharing_redis_make_one_token_request(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority, redis_server: RedisServer
) -> None:
    limits = {"backend": "redis", "redis_url": redis_server.url, "slow_down_initial": "0.5s",
              "slow_down_max": "2s"}
    with exchange(idp) as sink:
        env = {**ENV, "ENTRA_SECRET": SECRET}
        nodes = [relay_with_admin(tmp_path / f"node{i}", orgs=[contoso(sink.port, idp, ca)],
                                  limits={**limits, "node_id": f"node{i}"}).write()
                 for i in range(2)]
        with RelayProcess(nodes[0], env=env) as a, RelayProcess(nodes[1], env=env) as b:
            threads = [threading.Thread(target=send_many, args=(r.port, 5, 4)) for r in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            sink.wait_for(40, within=30)
            a.wait_events("delivered", 20)
            b.wait_events("delivered", 20)
            assert a.events("bounced") == b.events("bounced") == []
    assert idp.token_requests == 1, idp.grants  # two nodes, separate spools, one request
    assert {m.auth_identity for m in sink.messages} == {MAILBOX}
