"""Redaction of secrets from any text that leaves the relay (logs, replies, events, output).

One process-wide `REDACTOR` blanks (1) the initial response of an SMTP `AUTH` command
(RFC 4954 § 4: base64 of the credentials), (2) `password=…`, `token: …`,
`Authorization: Bearer …` style pairs, (3) SendGrid-shaped API keys, and (4) every secret
value the running configuration resolved (passwords, the admin token) or the relay obtained
at run time, wherever it appears.
"""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterable

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
    """Pattern- and value-based redaction. `remember` sets the configuration's secret values
    (replaced at each reload); `add` adds one value obtained at run time (an OAuth access
    token, say), of which the newest `MAX_ADDED` are kept."""

    MAX_ADDED = 256

    def __init__(self) -> None:
        self._config: frozenset[str] = frozenset()
        self._added: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self._values: tuple[str, ...] = ()
        self._lock = threading.Lock()

    def remember(self, values: Iterable[str]) -> None:
        with self._lock:
            self._config = frozenset(_worth_redacting(values))
            self._rebuild()

    def add(self, value: str) -> None:
        with self._lock:
            if not _worth_redacting([value]) or value in self._added:
                return
            self._added[value] = None
            while len(self._added) > self.MAX_ADDED:
                del self._added[next(iter(self._added))]
            self._rebuild()

    def _rebuild(self) -> None:
        self._values = tuple(sorted({*self._config, *self._added}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, REDACTED)
        for pattern, repl in _PATTERNS:
            text = pattern.sub(repl, text)
        return text


REDACTOR = Redactor()


def _worth_redacting(values: Iterable[str]) -> list[str]:
    # Very short values would blank ordinary words; a real credential is longer.
    return [v for v in values if len(v) >= 6]


def redact(text: str) -> str:
    return REDACTOR(text)


def auth_forms(password: str, user: str | None = None) -> list[str]:
    """A secret as an upstream may quote it back: as is, base64 as in AUTH LOGIN, and the
    AUTH PLAIN responses that carry it (RFC 4616: [authzid] NUL authcid NUL passwd)."""

    def b64(text: str) -> str:
        return base64.b64encode(text.encode("utf-8")).decode("ascii")

    forms = [password, b64(password)]
    if user:
        forms += [b64(f"\0{user}\0{password}"), b64(f"{user}\0{user}\0{password}")]
    return forms
