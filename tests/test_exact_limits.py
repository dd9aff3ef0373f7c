"""Issue 15 end to end: the real `relay serve` with two workers and the default (memory)
limits backend. Upstream limits are exact across workers whatever the spread of mail (all
of it on one client connection here, which one worker serves), quotas outlive a restart,
the queue says why mail waits, min_interval holds at the receiver, and failover respects
an organisation's region (relay/limits/machine.py, relay/scheduler/why.py,
relay/policy/failover.py)."""

from __future__ import annotations

import itertools
import json
import re
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream
from tests.sinks import Script, ThreadedSink

ORGS = [{"org": "acme", "domains": ["acme.test"]}]


def send_on_one_connection(port: int, n: int, sender: str = "a@acme.test") -> None:
    """`n` messages over one SMTP session: one worker accepts (and queues) all of them."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i in range(n):
            s.sendmail(sender, [f"r{i}@dest.test"], f"Subject: {i}\r\n\r\nbody {i}\r\n")


def wait_until(predicate: object, what: str, relay: RelayProcess, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{relay.output()}")
        time.sleep(0.05)


def queue_cli(relay: RelayProcess, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "relay.cli", "queue", "-c",
                          str(relay.config_dir), "--url", admin_url(relay), *args],
                         capture_output=True, text=True, timeout=60, env={**ENV, "PATH": ""})
    assert out.returncode == 0, out
    return out.stdout


def test_an_hourly_quota_is_exact_with_two_workers_says_why_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    with ThreadedSink() as sink:
        cfg = relay_with_admin(
            tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
            upstreams={"plain": plain_upstream(sink.port, throttle={"hourly": 10})},
        ).write()
        with RelayProcess(cfg, env=ENV) as relay:
            send_on_one_connection(relay.port, 15)
            sink.wait_for(10, 15)
            url = admin_url(relay)

            def five_waiting_for_quota() -> bool:
                _, listing, _ = http("GET", url + "/queue/messages")
                kinds = [m["waiting"]["kind"] for m in listing["messages"]]
                return kinds == ["quota"] * 5

            wait_until(five_waiting_for_quota, "5 messages waiting for the quota", relay)
            assert len(sink.messages) == 10
            _, listing, _ = http("GET", url + "/queue/messages")
            reason = listing["messages"][0]["waiting"]["reason"]
            # With the date when the hour's window opens tomorrow (a run after 23:00 UTC).
            assert re.fullmatch(r"waiting for quota hourly 10/10 on plain, window opens "
                                r"(\d{4}-\d\d-\d\d )?\d\d:\d\d:\d\dZ", reason), reason
            # The summary and the metric say the same, merged over both workers.
            _, summary, _ = http("GET", url + "/queue")
            assert [(w["kind"], w["upstream"], w["messages"]) for w in summary["waiting"]] == [
                ("quota", "plain", 5)]
            _, metrics, _ = http("GET", url + "/metrics", token=None)
            assert re.search(r'^relay_queue_waiting_messages\{reason="quota"\} 5(\.0)?$',
                             metrics, re.M), metrics
            shown = queue_cli(relay, "show", listing["messages"][0]["queue_id"])
            assert f"waiting:     {reason}" in shown
            assert f"quota                               5  {reason}" in queue_cli(relay)
            assert relay.stop() == 0
        # Restarted within the hour: the window is the same one, nothing more goes.
        with RelayProcess(cfg, env=ENV) as relay:
            send_on_one_connection(relay.port, 2)
            wait_until(lambda: relay.output().count("recovered") >= 2, "recovery", relay)
            time.sleep(1.5)  # deliberately: long enough for a reset quota to let mail through
            assert len(sink.messages) == 10
            _, listing, _ = http("GET", admin_url(relay) + "/queue/messages")
            assert [m["waiting"]["kind"] for m in listing["messages"]] == ["quota"] * 7
            assert relay.stop() == 0


def test_two_connections_are_shared_by_two_workers_where_the_mail_is(tmp_path: Path) -> None:
    """max_connections 2, every message on one client connection (so in one worker): that
    worker uses both connections, so 30 messages take 15 rounds, not 30."""
    delay = 0.2
    with ThreadedSink(script=Script(data_delay=delay)) as sink:
        cfg = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
                          upstreams={"plain": plain_upstream(sink.port, throttle={
                              "max_connections": 2})}).write()
        with RelayProcess(cfg) as relay:
            send_on_one_connection(relay.port, 30)
            sink.wait_for(30, 30)
            assert sink.max_concurrent == 2
            # Timed at the sink, first acceptance to last, so the client's own pace and a
            # slow machine's start do not count. One worker with both connections: 14
            # rounds of `delay` (2.8 s); one connection (each worker its static half): 29
            # rounds (5.8 s). The bound lies between them.
            times = sorted(m.timestamp for m in sink.messages)
            span = times[-1] - times[0]
            assert 14 * delay * 0.95 <= span < 21 * delay, span
            assert relay.stop() == 0


def test_min_interval_is_a_floor_between_mail_commands_at_the_receiver(tmp_path: Path) -> None:
    starts: list[float] = []

    def mail(sender: str) -> None:
        starts.append(time.monotonic())

    interval = 0.3
    with ThreadedSink(script=Script(mail_fn=mail)) as sink:  # type: ignore[arg-type]
        cfg = RelayConfig(tmp_path / "relay", workers=2, orgs=ORGS, default_upstream="plain",
                          upstreams={"plain": plain_upstream(sink.port, throttle={
                              "min_interval": f"{int(interval * 1000)}ms"})}).write()
        with RelayProcess(cfg) as relay:
            for i in range(3):  # three client connections: the kernel spreads them
                send_on_one_connection(relay.port, 2, sender=f"s{i}@acme.test")
            sink.wait_for(6, 20)
            assert relay.stop() == 0
    gaps = [b - a for a, b in itertools.pairwise(sorted(starts))]
    assert len(gaps) == 5 and min(gaps) >= interval, gaps


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_failover_after_the_configured_time_but_not_outside_an_orgs_region(
    tmp_path: Path,
) -> None:
    with ThreadedSink() as backup:
        dead = _closed_port()
        orgs = [
            {"org": "acme", "domains": ["acme.test"], "upstream": "primary",
             "failover": ["backup"], "failover_after": "1s"},
            {"org": "euro", "domains": ["euro.test"], "upstream": "primary", "region": "eu",
             "failover": ["backup"], "failover_after": "1s"},
        ]
        cfg = RelayConfig(
            tmp_path / "relay", workers=2, orgs=orgs,
            upstreams={"primary": plain_upstream(dead, region="eu"),
                       "backup": plain_upstream(backup.port, region="us")},
        ).write()
        route = subprocess.run(
            [sys.executable, "-m", "relay.cli", "route", "-c", str(cfg), "--sender",
             "x@euro.test"], capture_output=True, text=True, timeout=60)
        assert route.returncode == 0, route
        assert ("failover:      backup (region us) not used: region us is outside the"
                " organisation's region eu") in route.stdout
        with RelayProcess(cfg) as relay:
            first = time.time()  # before the first failed attempt starts the clock
            send_on_one_connection(relay.port, 1, sender="a@acme.test")
            send_on_one_connection(relay.port, 1, sender="e@euro.test")
            backup.wait_for(1, 15)
            delivered = relay.wait_events("delivered", 1)
            assert delivered[0]["upstream"] == "backup" and delivered[0]["org"] == "acme"
            assert delivered[0]["failover"].startswith(
                "failover to backup: primary unusable for"), delivered[0]
            assert backup.messages[0].timestamp - first >= 1.0
            time.sleep(2.0)  # deliberately: euro's message would have failed over by now
            assert [m.mail_from for m in backup.messages] == ["a@acme.test"]
            euro = [e for e in relay.events("deferred") if e["org"] == "euro"]
            assert euro and {e["upstream"] for e in euro} == {"primary"}
            assert relay.stop() == 0
    # The platform learns it too: the delivered event names the failover (every shard).
    events = []
    for db in sorted((tmp_path / "relay").rglob("spool.db")):
        with sqlite3.connect(db) as conn:
            events += [json.loads(d) for (d,) in conn.execute(
                "SELECT data FROM events WHERE type = 'delivered'")]
    [acme] = [e for e in events if e["org"] == "acme"]
    assert acme["upstream"] == "backup"
    assert acme["failover"].startswith("failover to backup: primary unusable for")
