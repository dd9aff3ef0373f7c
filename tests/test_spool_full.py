"""Issue 12, finding 6: a full spool file system answers clients 451 4.3.0 (as before) and
tells the operator once, clearly: one rate-limited warning (no traceback per refused
message or failed retry record), the gauge `relay_spool_full`, and /readyz answering 503
with the reason, until space returns. A real `relay serve` on a real 6 MB tmpfs."""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from relay.core.errors import SpoolError
from relay.spool.health import SpoolHealth, is_full
from tests import test_faults_relay as faults
from tests.adminapi import ENV, admin_url, http, relay_with_admin
from tests.relayproc import RelayProcess, plain_upstream

small_fs = faults.small_fs  # the tmpfs fixture, used by name


def _warnings(relay: RelayProcess) -> list[str]:
    out = []
    for line in relay.stderr:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("level") == "warning" and "spool is full" in record.get("msg", ""):
            out.append(record["msg"])
    return out


def test_a_full_spool_is_one_warning_a_metric_and_readyz_says_why(
    tmp_path: Path, small_fs: Path
) -> None:
    port = faults._free_port()  # the upstream is down: queued mail retries meanwhile
    cfg = relay_with_admin(
        tmp_path / "relay",
        upstreams={"plain": plain_upstream(port)},
        default_upstream="plain",
        spool={"path": str(small_fs / "spool")},
        retry={"schedule": ["1s"], "jitter": 0, "max_age": "1h"},
    ).write()
    with RelayProcess(cfg, env=ENV) as relay:
        url = admin_url(relay)
        for i in range(3):
            assert faults._try_send(relay.port, f"before-{i}", 0)[0] == 250
        relay.wait_events("deferred", 3)
        status, ready, _ = http("GET", f"{url}/readyz", token=None)
        assert status == 200 and ready["ready"] is True and ready.get("spool_full") is None
        ballast = faults._fill(small_fs)
        refused = [faults._try_send(relay.port, f"during-{i}", 300_000) for i in range(4)]
        assert all(code == 451 for code, _ in refused), refused
        n = len(relay.events("deferred"))
        relay.wait_events("deferred", n + 3)  # retries whose state cannot be written either
        status, ready, _ = http("GET", f"{url}/readyz", token=None)
        assert status == 503 and ready["ready"] is False, ready
        assert "full" in ready["spool_full"], ready
        status, metrics, _ = http("GET", f"{url}/metrics", token=None)
        assert "relay_spool_full 1.0" in metrics
        assert len(_warnings(relay)) == 1, relay.output()  # rate-limited: once, not per failure
        assert "Traceback" not in relay.output(), relay.output()
        ballast.unlink()
        deadline = time.monotonic() + 10
        while faults._try_send(relay.port, "after", 300_000)[0] != 250:
            assert time.monotonic() < deadline, relay.output()
            time.sleep(0.2)
        status, ready, _ = http("GET", f"{url}/readyz", token=None)
        assert status == 200 and ready["ready"] is True, ready
        assert "relay_spool_full 0.0" in http("GET", f"{url}/metrics", token=None)[1]
    assert "Traceback" not in relay.output(), relay.output()


def test_the_full_warning_is_repeated_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    health = SpoolHealth(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, "relay.spool")
    for _ in range(50):
        health.full("SQLITE_FULL", 1)
        now[0] += 1.0  # 50 failed writes over 50 s: one warning
    assert [r.getMessage().startswith("spool is full") for r in caplog.records] == [True]
    assert health.reason is not None and "SQLITE_FULL" in health.reason
    now[0] += 10.0
    health.full("SQLITE_FULL", 2)  # a minute after the first: said again, with the count
    assert len(caplog.records) == 2 and "52 write(s)" in caplog.records[-1].getMessage()
    health.committed()
    assert health.reason is None
    assert caplog.records[-1].getMessage().startswith("spool has room again")
    assert is_full(sqlite3.OperationalError("database or disk is full")) is False  # no name
    err = sqlite3.OperationalError("database or disk is full")
    err.sqlite_errorname = "SQLITE_FULL"  # what sqlite3 sets on the real error
    assert is_full(SpoolError(reason="x")) is False
    wrapped = SpoolError(reason="spool write failed")
    wrapped.__cause__ = err
    assert is_full(wrapped) and is_full(OSError(errno.ENOSPC, "No space left on device"))
