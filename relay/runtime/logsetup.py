"""Structured logging for the `relay` loggers: one JSON object per line, secrets redacted.

The listener and delivery already avoid logging credentials; this is the second line of
defence: every record passes the process-wide `Redactor` of relay/core/redact.py. Format
`text` keeps the classic one-line human format, still redacted.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import IO, Any

from relay.core.redact import REDACTOR, Redactor, auth_forms

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
    """Redact every resolved upstream password, with its AUTH LOGIN/PLAIN base64 forms, a
    user name that came from a secret reference (a Mailjet API key), every OAuth secret
    (client secrets, private keys, service account keys, refresh tokens), and `extra` (e.g.
    the admin token)."""
    values: list[str] = []
    for u in config.upstreams.values():
        if u.password is not None:
            values += auth_forms(u.password.reveal(), u.username)
        if u.id in config.username_refs and u.username:
            values += auth_forms(u.username)
        if u.oauth is not None:
            values += [s.reveal() for s in u.oauth.secrets()]
    REDACTOR.remember([*values, *extra])
