"""`relay queue` against a running relay (through its admin API): summary, list with
filters, show, and the actions by id and by filter; token handling."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.cli import main
from relay.ops.shape import EDGES_MINUTES
from tests.adminapi import ENV, TOKEN, admin_url, relay_with_admin
from tests.relayproc import RelayProcess, plain_upstream, send
from tests.sinks import Script, ThreadedSink


# workers 2: the same commands through the supervisor's API, which asks both workers and
# merges their answers (relay/runtime/fanout.py); the queue ids land in either shard.
@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def running(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[RelayProcess, ThreadedSink, list[str]]]:
    defer = Script(rcpt_fn=lambda r: "451 4.3.0 busy" if r.endswith("@defer.test") else None)
    with ThreadedSink(script=defer) as sink:
        cfg = relay_with_admin(
            tmp_path / "relay",
            upstreams={"plain": plain_upstream(sink.port)},
            default_upstream="plain",
            retry={"schedule": ["1h"], "jitter": 0, "max_age": "1d"},
            orgs=[{"org": "acme", "domains": ["acme.test"]}, {"org": "globex", "domains": ["globex.test"]}],
            workers=request.param,
        ).write()
        with RelayProcess(cfg, env=ENV) as relay:
            ids = [send(relay.port, s, [r]).split()[-1] for s, r in
                   (("a@acme.test", "x@defer.test"), ("b@acme.test", "y@defer.test"),
                    ("c@globex.test", "z@defer.test"))]
            relay.wait_events("deferred", 3)
            yield relay, sink, ids


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def queue(relay: RelayProcess, *args: str, token: str | None = TOKEN) -> Run:
    """`relay queue ...` run in this process (its HTTP to the relay is real; in-process only
    saves an interpreter start per call)."""
    out, err = io.StringIO(), io.StringIO()
    saved = os.environ.pop("RELAY_ADMIN_TOKEN", None)
    if token is not None:
        os.environ["RELAY_ADMIN_TOKEN"] = token
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["queue", "-c", str(relay.config_dir), "--url", admin_url(relay), *args])
    finally:
        os.environ.pop("RELAY_ADMIN_TOKEN", None)
        if saved is not None:
            os.environ["RELAY_ADMIN_TOKEN"] = saved
    return Run(rc, out.getvalue(), err.getvalue())


def test_views(running: tuple[RelayProcess, ThreadedSink, list[str]]) -> None:
    relay, _, ids = running
    out = queue(relay)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("3 messages, 3 recipients pending, 0 held")
    assert any(line.split()[:2] == ["acme", "2"] for line in out.stdout.splitlines())
    out = queue(relay, "list", "--org", "globex")
    assert out.returncode == 0
    rows = out.stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [ids[2]]
    assert "451 4.3.0 busy" in rows[0]
    doc = json.loads(queue(relay, "--json", "list", "--upstream", "plain", "--older-than", "1h").stdout)
    assert doc["count"] == 0
    out = queue(relay, "show", ids[0])
    assert f"queue_id:    {ids[0]}" in out.stdout and "x@defer.test  pending  attempts=1" in out.stdout
    assert queue(relay, "show", "NOPE").returncode == 1
    # Token handling, on the same relay.
    out = queue(relay, token="wrong")
    assert out.returncode == 1 and "401" in out.stderr
    out = queue(relay, token=None)  # the config's reference env:RELAY_ADMIN_TOKEN is unset here
    assert out.returncode == 1 and "RELAY_ADMIN_TOKEN" in out.stderr and "--token-file" in out.stderr


def test_shape(running: tuple[RelayProcess, ThreadedSink, list[str]]) -> None:
    relay, _, _ = running
    out = queue(relay, "shape", "--by", "org")
    assert out.returncode == 0, out.stderr
    header, total, *groups = out.stdout.splitlines()
    assert header.split() == ["by", "org", "T", *(f"{m}m" for m in EDGES_MINUTES), "1280m+"]
    # All three were received seconds ago: the first bucket (0-5m) holds them.
    assert total.split() == ["TOTAL", "3", "3", *["0"] * 9]
    assert [g.split()[:3] for g in groups] == [["acme", "2", "2"], ["globex", "1", "1"]]
    out = queue(relay, "shape", "--json")
    data = json.loads(out.stdout)
    assert data["by"] == "upstream" and data["groups"] == {"plain": [3, *[0] * 9]}
    assert data["total"] == [3, *[0] * 9]


def test_test_upstream_through_the_running_relay(
    running: tuple[RelayProcess, ThreadedSink, list[str]],
) -> None:
    relay, _, _ = running
    cmd = [sys.executable, "-m", "relay.cli", "test-upstream", "plain", "--api", "-c",
           str(relay.config_dir), "--url", admin_url(relay), "--rcpt-to", "x@defer.test"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("test-upstream plain: 127.0.0.1:") and "(127.0.0.2)" in lines[0]
    assert "RCPT: 451 4.3.0 busy ... FAILED" in out.stdout
    assert lines[-1] == "result: FAILED"


def test_actions(running: tuple[RelayProcess, ThreadedSink, list[str]]) -> None:
    relay, sink, ids = running
    out = queue(relay, "hold", "--org", "acme")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "hold: 2 matched, 2 ok"
    out = queue(relay, "retry", ids[0])
    assert out.returncode == 1 and "is held: release it" in out.stdout
    assert queue(relay, "release", ids[0]).returncode == 0
    relay.wait_events("deferred", 4)
    assert queue(relay, "retry", "--account", "c@globex.test").returncode == 0
    relay.wait_events("deferred", 5)
    out = queue(relay, "bounce", ids[1], "--reason", "customer asked")
    assert out.returncode == 0 and "DSN" in out.stdout
    sink.wait_for(1)
    assert sink.messages[0].rcpt_tos == ["b@acme.test"] and b"customer asked" in sink.messages[0].data
    assert queue(relay, "delete").returncode == 2  # no ids, no filter: refused
    out = queue(relay, "delete", "--all")
    assert out.returncode == 0 and out.stdout.splitlines()[-1] == "delete: 2 matched, 2 ok"
    assert queue(relay).stdout.startswith("0 messages")
