"""Structured logging for the `relay` loggers: one JSON object per line, secrets redacted.

The listener and delivery already avoid logging credentials; this is the second line of
defence. Every record passes a `Redactor` that blanks (1) the initial response of an SMTP `AUTH`
command (RFC 4954 § 4: base64 of the credentials), (2) `password=…`,
`token: …`, `Authorization: Bearer …` style pairs, (3) SendGrid-shaped API keys, and (4)
every secret value the running configuration resolved (passwords, the admin token), wherever
it appears. Format `text` keeps the classic one-line human format, still redacted.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import IO, Any

REDACTED = "[redacted]"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # AUTH PLAIN <initial response>, AUTH LOGIN <user>, AUTH XOAUTH2 <token>, ...
    (
        re.compile(
            r"(\bAUTH\s+(?:PLAIN|LOGIN|CRAM-MD5|DIGEST-MD5|XOAUTH2|OAUTHBEARER|SCRAM-[A-Z0-9-]+|NTLM))"
            r"\s+(?!\[redacted\])\S+",
            re.IGNORECASE,
        ),
        rf"\1 {REDACTED}",
    ),
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\1 {REDACTED}"),
    # key=value and "key": "value" (JSON). Not "key: words": that is how our own warnings
    # name a missing credential ("admin token: environment variable ... is not set").
    (
        re.compile(
            r"\b(password|passwd|pwd|secret|token|api[_-]?key)=(?!env:|file:|credential:)[^\s,;&]+",
            re.IGNORECASE,
        ),
        rf"\1={REDACTED}",
    ),
    (
        re.compile(
            r"\"(password|passwd|pwd|secret|token|api[_-]?key)\"\s*:\s*\"(?!env:|file:|credential:)[^\"]*\"",
            re.IGNORECASE,
        ),
        rf'"\1": "{REDACTED}"',
    ),
    (re.compile(r"\bSG\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), REDACTED),
)


class Redactor:
    """Pattern- and value-based redaction; `remember` adds exact secret values."""

    def __init__(self) -> None:
        self._values: frozenset[str] = frozenset()
        self._lock = threading.Lock()

    def remember(self, values: Iterable[str]) -> None:
        # Very short values would blank ordinary words; a real credential is longer.
        with self._lock:
            self._values = frozenset(v for v in values if len(v) >= 6)

    def __call__(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


REDACTOR = Redactor()

# Attributes every LogRecord has; anything else was passed with `extra=` and is kept.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redact = redactor

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self.redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = self.redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = self.redact(self.formatException(record.exc_info))
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redactor

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z"

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


def configure(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Route the root logger (so aiohttp's records too) through one handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would log each scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def remember_config_secrets(config: Any, extra: Iterable[str] = ()) -> None:
    """Redact every resolved upstream password (and `extra`, e.g. the admin token)."""
    values = [u.password.reveal() for u in config.upstreams.values() if u.password is not None]
    REDACTOR.remember([*values, *extra])
