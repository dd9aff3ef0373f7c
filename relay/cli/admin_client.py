"""The running relay's admin API as the CLI sees it: URL and token from the configuration,
`--url`, `--token-file` or $RELAY_ADMIN_TOKEN; answers decoded, failures as one message."""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from relay.cli import shell
from relay.cli.common import load_or_report
from relay.config.model import Config
from relay.config.secrets import SecretUnavailable, resolve_secret

TOKEN_ENV = "RELAY_ADMIN_TOKEN"


class AdminError(Exception):
    """The API could not be reached, or refused us; the message is for the operator."""


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        config = load_or_report(args.config) if args.config else None
        if args.config and config is None:
            raise AdminError("the configuration does not load (errors above)")
        url = args.url
        if url is None:
            if config is None:
                raise AdminError("give -c CONFIG or --url")
            a = config.relay.admin
            if not a.enabled:
                raise AdminError("the admin API is disabled (admin.enabled: false)")
            host = f"[{a.address}]" if ":" in a.address else a.address
            url = f"http://{host}:{a.port}"
        return cls(url, admin_token(args, config))

    def call(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        full = self.url + path + ("?" + urllib.parse.urlencode(q) if q else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(full, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _decode(resp.read(), resp.headers.get_content_type())
        except urllib.error.HTTPError as exc:
            payload = _decode(exc.read(), exc.headers.get_content_type())
            if exc.code in (401, 403):
                msg = payload.get("error") if isinstance(payload, dict) else payload
                raise AdminError(f"{exc.code}: {msg}") from None
            return exc.code, payload
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"cannot reach the relay's admin API at {self.url}: {reason}"
                " (is `relay serve` running?)"
            ) from None


def _decode(raw: bytes, ctype: str) -> Any:
    text = raw.decode("utf-8", "replace")
    if ctype == "application/json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def admin_token(args: argparse.Namespace, config: Config | None) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise AdminError(f"cannot read {args.token_file}: {exc.strerror}") from None
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    ref = config.relay.admin.token if config else None
    if not ref:
        return None
    try:
        return resolve_secret(ref, base_dir=config.base_dir).reveal() if config else None
    except SecretUnavailable as exc:
        raise AdminError(
            f"admin token {ref}: {exc}. Give --token-file (e.g. the file systemd's"
            f" LoadCredential= reads) or set {TOKEN_ENV}"
        ) from None


def add_api_args(sp: argparse.ArgumentParser) -> None:
    shell.complete_directory(sp.add_argument("-c", "--config", help="configuration directory (for the admin URL and token)"))
    sp.add_argument("--url", help="admin API URL (default: from the config's admin: section)")
    sp.add_argument("--token-file", help=f"file holding the admin token (else ${TOKEN_ENV})")


