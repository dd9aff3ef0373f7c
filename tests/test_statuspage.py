"""The status page in a real headless browser (Debian's chromium, driven by Playwright):
the login form, then the state of a running relay with delivered, queued and deferred mail;
a screenshot lands in tests/output/ and its path is printed in the test output."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

from tests.adminapi import ENV, TOKEN, admin_url, http, relay_with_admin
from tests.relayproc import RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink

OUTPUT = Path(__file__).resolve().parent / "output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# As the machine's notes say: no background networking (the sandbox has no outside network).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-process", "two-workers"])
def test_the_status_page_shows_a_running_relay(
    tmp_path: Path, browser: Browser, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    refuse = Script(rcpt_fn=lambda r: "451 4.2.0 mailbox busy, try later" if r.startswith("busy")
                    else None)
    with ThreadedSink() as good, ThreadedSink(script=refuse) as flaky:
        cfg = relay_with_admin(
            tmp_path / "relay",
            upstreams={"good": plain_upstream(good.port), "flaky": plain_upstream(flaky.port)},
            default_upstream="good",
            orgs=[{"org": "acme", "domains": ["acme.test"], "upstream": "flaky"},
                  {"org": "globex", "domains": ["globex.test"]}],
            retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"},
            workers=workers,
        ).write()
        with RelayProcess(cfg, env=ENV) as relay:
            url = admin_url(relay)
            for i in range(3):
                send(relay.port, "news@globex.test", [f"reader{i}@example.test"])
            send(relay.port, "survey@acme.test", ["busy1@example.test"])
            send(relay.port, "survey@acme.test", ["busy2@example.test"])
            relay.wait_events("delivered", 3)
            relay.wait_events("deferred", 2)

            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            try:
                page.goto(f"{url}/status")
                assert page.locator("form input[name=token]").count() == 1  # the login form
                page.fill("input[name=token]", "wrong")
                page.click("button[type=submit]")
                assert "wrong token" in page.content()
                page.fill("input[name=token]", TOKEN)
                page.click("button[type=submit]")
                page.wait_for_selector("#upstreams")
                text = page.inner_text("body")
                # sendgrid and mailjet lack credentials, but nothing routes to them.
                assert page.inner_text("#health") == "ok"
                # The queue: the two deferred messages wait for `flaky`.
                assert page.inner_text("[data-stat=queued] .big") == "2"
                assert page.inner_text("[data-stat=delivered] .big") == "3"
                assert page.inner_text("[data-stat=deferred] .big") == "2"
                flaky_row = page.locator("#upstreams tr", has_text="flaky").inner_text()
                assert "active" in flaky_row and "\t2\t" in flaky_row
                # Why they wait: deferred by flaky, next attempt in an hour.
                waiting = page.locator("#waiting tr", has_text="flaky").inner_text()
                assert waiting.startswith("2\tretry\tflaky\tdeferred: next attempts from")
                # The latest deferrals carry the upstream's own reply.
                assert text.count("451 4.2.0 mailbox busy, try later") == 2
                # The last hour's chart has bars; the queue-by-age chart counts the two.
                assert page.locator("#activity svg rect").count() >= 1
                assert "2 queued messages" in page.locator("#ages svg rect").first.inner_html()
                assert "127.0.0.2" in page.inner_text("#egress")
                if workers == 2:
                    assert "2/2 workers up" in page.inner_text("header")
                OUTPUT.mkdir(exist_ok=True)
                shot = OUTPUT / f"status-page-{workers}-worker{'s' if workers > 1 else ''}.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                with capsys.disabled():
                    print(f"\nstatus page screenshot: {shot}")
            finally:
                page.close()
            # The cookie opens only the read-only views; the API still wants the bearer token.
            status, body, _ = http("GET", f"{url}/status.json")
            assert status == 200 and body["queue"]["messages"] == 2
            status, _, _ = http("GET", f"{url}/queue", token=None)
            assert status == 401


def test_the_status_document_merges_workers_like_the_page(tmp_path: Path) -> None:
    with ThreadedSink() as sink:
        cfg = relay_with_admin(
            tmp_path / "relay", default_upstream="s", workers=2,
            upstreams={"s": plain_upstream(sink.port, throttle={"hourly": 10,
                                                                 "max_connections": 4})},
        ).write()
        with RelayProcess(cfg, env=ENV) as relay:
            for i in range(4):
                send(relay.port, "a@x.test", [f"r{i}@y.test"])
            relay.wait_events("delivered", 4)
            status, body, _ = http("GET", f"{admin_url(relay)}/status.json")
    assert status == 200, body
    assert body["health"]["workers"] == 2 and body["health"]["workers_up"] == 2
    assert body["activity"]["totals"]["delivered"] == 4
    assert sum(body["activity"]["per_minute"]["delivered"]) == 4
    assert [u["id"] for u in body["upstreams"]] == sorted(u["id"] for u in body["upstreams"])
    # Limits and their use now, shared by the workers (one figure, not one per worker).
    [s_up] = [u for u in body["upstreams"] if u["id"] == "s"]
    assert s_up["limits"] == {"max_connections": 4, "hourly": 10}
    assert "10 messages per hour: 4 used" in s_up["use"], s_up["use"]
    json.dumps(body)  # one JSON document, nothing else


def test_relay_top_shows_rates_queue_and_upstreams(tmp_path: Path) -> None:
    refuse = Script(rcpt_fn=lambda r: "451 4.2.0 mailbox busy" if r.startswith("busy") else None)
    with ThreadedSink(script=refuse) as sink:
        cfg = relay_with_admin(tmp_path / "relay", upstreams={"s": plain_upstream(sink.port)},
                               default_upstream="s", workers=2,
                               retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"}).write()
        with RelayProcess(cfg, env=ENV) as relay:
            url = admin_url(relay)
            send(relay.port, "a@x.test", ["busy@y.test"])
            relay.wait_events("deferred", 1)
            top = subprocess.Popen(
                [sys.executable, "-m", "relay.cli", "top", "--once", "--interval", "1.5",
                 "-c", str(cfg), "--url", url], stdout=subprocess.PIPE, text=True,
                env={**os.environ, **ENV},
            )
            # Mail flows while top takes its two samples, so its rates cannot be zero.
            deadline = time.monotonic() + 30
            i = 0
            while top.poll() is None and time.monotonic() < deadline:
                send(relay.port, "a@x.test", [f"ok{i}@y.test"])
                i += 1
                time.sleep(0.1)
            out, _ = top.communicate(timeout=30)
    assert top.returncode == 0, out
    lines = out.splitlines()
    assert "ready" in lines[0] and "workers 2/2 up" in lines[0]
    rates = dict(re.findall(r"(\w+) ([\d.]+)/s", lines[1]))
    assert float(rates["received"]) > 0 and float(rates["delivered"]) > 0
    # The deferred message waits; one just submitted may be in flight beside it.
    queued = re.match(r"queue +(\d+) messages, (\d+) recipients pending, 0 held", lines[2])
    assert queued is not None and int(queued.group(1)) >= 1, lines[2]
    row = next(line for line in lines if line.startswith("s "))
    assert row.split()[:2] == ["s", "active"] and int(row.split()[2]) >= 1
    assert any("busy@y.test: 451 4.2.0 mailbox busy" in line for line in lines)
    assert any(line.split()[1:3] == ["retry", "deferred:"] for line in lines
               if line.startswith("  ") and line.split()[0].isdigit()), out
