"""Structured logs: one JSON object per line from the real relay, and redaction of AUTH
arguments, password-like pairs and every resolved secret value (defence in depth)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from relay.core.redact import REDACTED, Redactor
from relay.runtime.logsetup import JsonFormatter, TextFormatter
from tests.relayproc import RelayConfig, RelayProcess, plain_upstream, send
from tests.sinks import ThreadedSink


@pytest.mark.parametrize("text,expected", [
    ("AUTH PLAIN AHVzZXIAcGFzc3dvcmQ=", f"AUTH PLAIN {REDACTED}"),
    ("client sent: auth login dXNlcg==", f"client sent: auth login {REDACTED}"),
    ("AUTH PLAIN: 535 5.7.8 Authentication credentials invalid",
     "AUTH PLAIN: 535 5.7.8 Authentication credentials invalid"),  # our probe's step line
    ("url?user=a&password=s3cr3t&x=1", f"url?user=a&password={REDACTED}&x=1"),
    ('{"password": "s3cr3t", "user": "a"}', f'{{"password": "{REDACTED}", "user": "a"}}'),
    ("password=env:SENDGRID_API_KEY", "password=env:SENDGRID_API_KEY"),  # a reference is safe
    ("Authorization: Bearer abc.def-ghi", f"Authorization: Bearer {REDACTED}"),
    ("key SG.abcdefghijk.lmnopqrstuvwxyz used", f"key {REDACTED} used"),
    ("admin token: environment variable X is not set", "admin token: environment variable X is not set"),
])
def test_redaction_patterns(text: str, expected: str) -> None:
    assert Redactor()(text) == expected


def test_known_secret_values_are_redacted_anywhere() -> None:
    r = Redactor()
    r.remember(["correct-horse-battery", "abc"])  # too short values are not remembered
    assert r("upstream said: bad password correct-horse-battery!") == f"upstream said: bad password {REDACTED}!"
    assert r("abc") == "abc"


def test_json_formatter_one_object_per_line() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("relay.test-logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("line one\nAUTH PLAIN AGZvbwBiYXI= from %s", "127.0.0.1",
                       extra={"queue_id": "Q1", "note": "password=hunter22"})
        try:
            raise ValueError("boom password=hunter22")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # a newline in a message stays inside its JSON string
    first = json.loads(lines[0])
    assert first["level"] == "warning" and first["logger"] == "relay.test-logs"
    assert first["msg"] == f"line one\nAUTH PLAIN {REDACTED} from 127.0.0.1"
    assert first["queue_id"] == "Q1" and first["note"] == f"password={REDACTED}"
    second = json.loads(lines[1])
    assert "ValueError: boom password=[redacted]" in second["exc"]
    assert "hunter22" not in stream.getvalue()


def test_text_format_is_redacted_too() -> None:
    rec = logging.LogRecord("relay", logging.INFO, __file__, 1, "AUTH LOGIN dXNlcg==", None, None)
    assert TextFormatter().format(rec).endswith(f"INFO relay: AUTH LOGIN {REDACTED}")


def test_relay_logs_are_json_and_never_hold_secrets(tmp_path: Path) -> None:
    with ThreadedSink(auth={"user": "the-right-password"}, auth_require_tls=False) as sink:
        cfg = RelayConfig(
            tmp_path / "relay",
            upstreams={"own": plain_upstream(sink.port, username="user", password="env:OWN_PASSWORD")},
            default_upstream="own",
            log={"mail_log": "mail.log", "level": "debug", "format": "json"},
        ).write()
        with RelayProcess(cfg, env={"OWN_PASSWORD": "wrong-password-xyz"}) as relay:
            send(relay.port, "a@x.test", ["b@y.test"])
            [d] = relay.wait_events("deferred", 1)
            assert d["reply"].startswith("535")
    lines = [line for line in relay.stderr if not line.startswith("relay: ")]
    assert lines, relay.output()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["logger"].startswith("relay.delivery") for r in records)
    assert "wrong-password-xyz" not in relay.output()
    assert "wrong-password-xyz" not in (cfg / "mail.log").read_text()
