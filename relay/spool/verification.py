"""Which `verify: true` upstreams have been verified (the verified switch-over), kept durably.

One small JSON file under the (unsharded) spool directory, `upstreams/verification.json`,
shared by every worker; written under a `flock` and replaced atomically; read again only
when it changed (its mtime and size), so routing can ask on every dispatch.

An upstream counts as verified while the fingerprint it was verified with still matches:
its host, port, TLS mode, user and credential references (relay.config.oauth.fingerprint)
plus an HMAC of its secret values under a random key kept beside the file (`upstreams/key`,
mode 0600) — so changing any of them makes it unverified again, and no hash of a password
is ever written. A pending verification keeps only a hash of its one-time code.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.config.model import Config
from relay.core.model import Upstream

CODE_TTL = 24 * 3600.0  # a code is good for a day
MAX_TRIES = 5  # wrong codes before a new message must be sent
_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L


@dataclass(frozen=True)
class Outcome:
    ok: bool
    text: str


def _secret_values(u: Upstream) -> list[str]:
    values = [u.password.reveal()] if u.password else []
    if u.oauth is not None:
        values += [s.reveal() for s in u.oauth.secrets()]
    return values


def new_code() -> str:
    raw = "".join(secrets.choice(_ALPHABET) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.strip().upper().replace(" ", "").encode()).hexdigest()


class VerificationStore:
    def __init__(self, directory: Path, clock: Any = time.time) -> None:
        self.dir = directory
        self.file = directory / "verification.json"
        self.clock = clock
        self._stamp: tuple[int, int] | None = None
        self._data: dict[str, Any] = {}
        self._key: bytes | None = None
        self._cache: tuple[tuple[int, int] | None, int, frozenset[str]] | None = None
        self._checked = 0.0

    # -- reading ---------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        try:
            st = self.file.stat()
        except OSError:
            self._stamp, self._data = None, {}
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                data = json.loads(self.file.read_text())
            except (OSError, ValueError):
                data = {}
            self._data = data if isinstance(data, dict) else {}
            self._stamp = stamp
        return self._data

    def _secret_key(self, create: bool) -> bytes | None:
        if self._key is not None:
            return self._key
        path = self.dir / "key"
        try:
            self._key = path.read_bytes()
        except FileNotFoundError:
            if not create:
                return None
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
            finally:
                os.close(fd)
            self._key = path.read_bytes()
        except OSError:
            return None
        return self._key

    def fingerprint(self, u: Upstream, *, create_key: bool = False) -> str | None:
        key = self._secret_key(create_key)
        if key is None:
            return None
        mac = hmac.new(key, "\x00".join(_secret_values(u)).encode(), hashlib.sha256)
        return f"{u.fingerprint}:{mac.hexdigest()[:32]}"

    def verified_ids(self, config: Config) -> frozenset[str]:
        """The `verify: true` upstreams verified with their current settings. Cheap to call
        on every dispatch: the file is looked at once a second at most."""
        now = time.monotonic()
        if self._cache is not None and self._cache[1] == id(config) and now - self._checked < 1.0:
            return self._cache[2]
        self._checked = now
        data = self._load()
        if self._cache is not None and self._cache[:2] == (self._stamp, id(config)):
            return self._cache[2]
        entries = data.get("upstreams", {})
        out = set()
        for uid, u in config.upstreams.items():
            if not u.verify:
                continue
            done = entries.get(uid, {}).get("verified")
            if isinstance(done, dict) and done.get("fingerprint") == self.fingerprint(u):
                out.add(uid)
        result = frozenset(out)
        self._cache = (self._stamp, id(config), result)
        return result

    def status(self, u: Upstream) -> dict[str, Any]:
        entry = self._load().get("upstreams", {}).get(u.id, {})
        done = entry.get("verified")
        fp = self.fingerprint(u)
        pending = entry.get("pending")
        return {
            "verify": u.verify,
            "verified": bool(isinstance(done, dict) and done.get("fingerprint") == fp),
            "verified_at": done.get("at") if isinstance(done, dict) else None,
            "changed_since_verified": bool(isinstance(done, dict) and done.get("fingerprint") != fp),
            "pending": {k: pending.get(k) for k in ("send_to", "sent_at", "expires_at")}
            if isinstance(pending, dict) else None,
        }

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.dir / "verification.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._stamp = None  # read it afresh under the lock
            data = json.loads(json.dumps(self._load()))
            yield data
            tmp = self.file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.file)
            self._stamp = None
            self._cache = None  # this process sees its own change at once
        finally:
            os.close(fd)

    def begin(self, u: Upstream, send_to: str) -> str:
        """A new one-time code for `u` (the previous one stops working)."""
        code = new_code()
        fp = self.fingerprint(u, create_key=True)
        now = self.clock()
        with self._locked() as data:
            entry = data.setdefault("upstreams", {}).setdefault(u.id, {})
            entry["pending"] = {"code": _code_hash(code), "fingerprint": fp, "send_to": send_to,
                                "sent_at": now, "expires_at": now + CODE_TTL, "tries": 0}
        return code

    def cancel(self, u: Upstream) -> None:
        with self._locked() as data:
            data.get("upstreams", {}).get(u.id, {}).pop("pending", None)

    def confirm(self, u: Upstream, code: str) -> Outcome:
        fp = self.fingerprint(u, create_key=True)
        now = self.clock()
        with self._locked() as data:
            entry = data.setdefault("upstreams", {}).setdefault(u.id, {})
            pending = entry.get("pending")
            if not isinstance(pending, dict):
                return Outcome(False, f"no verification is pending for {u.id}: send a code first"
                               " (relay verify-upstream NAME --send-to ADDR)")
            if now > float(pending.get("expires_at", 0)):
                entry.pop("pending", None)
                return Outcome(False, "the code has expired: send a new one")
            if pending.get("fingerprint") != fp:
                entry.pop("pending", None)
                return Outcome(False, f"{u.id}'s settings changed since the code was sent: send"
                               " a new one")
            pending["tries"] = int(pending.get("tries", 0)) + 1
            if not hmac.compare_digest(str(pending.get("code")), _code_hash(code)):
                if pending["tries"] >= MAX_TRIES:
                    entry.pop("pending", None)
                    return Outcome(False, "wrong code, too many tries: send a new one")
                return Outcome(False, "wrong code")
            entry.pop("pending", None)
            entry["verified"] = {"fingerprint": fp, "at": now, "send_to": pending.get("send_to")}
        return Outcome(True, f"{u.id} is verified: it carries its mail from now on")
