"""Helpers for tests of the admin API: a relay subprocess with the API on an ephemeral
loopback port, and a tiny real-HTTP client (urllib)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.relayproc import RelayConfig, RelayProcess

TOKEN = "test-admin-token-8f3a1c"
ADMIN_LINE = re.compile(r"relay: admin API http://(\S+):(\d+)")
ADMIN = {"enabled": True, "address": "127.0.0.1", "port": 0, "token": "env:RELAY_ADMIN_TOKEN"}


def admin_url(relay: RelayProcess) -> str:
    for line in relay.stderr:
        m = ADMIN_LINE.search(line)
        if m:
            return f"http://{m.group(1)}:{m.group(2)}"
    raise AssertionError(f"no admin API line in the relay's output:\n{relay.output()}")


def http(method: str, url: str, body: Any = None, token: str | None = TOKEN,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw, status, hdrs = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    text = raw.decode()
    if hdrs.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(text), hdrs
    return status, text, hdrs


def relay_with_admin(directory: Path, **kw: Any) -> RelayConfig:
    kw.setdefault("admin", ADMIN)
    return RelayConfig(directory, **kw)


ENV = {"RELAY_ADMIN_TOKEN": TOKEN}
