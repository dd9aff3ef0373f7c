"""Password hashes for SMTP AUTH users: scrypt hashing, constant-time checks, the users file.

Hash format (one string, no spaces, safe in a `user:hash` line)::

    scrypt$N$r$p$salt_b64$hash_b64

- `scrypt`: the scheme name; the only one accepted.
- `N`, `r`, `p`: decimal scrypt cost parameters (RFC 7914 § 2): N a power of two.
- `salt_b64`, `hash_b64`: standard base64 (RFC 4648 § 4, `=` padding optional) of the
  salt and of the derived key; the derived key length is the decoded length of hash_b64.

`hash_password` uses N=2**14, r=8, p=1 (16 MiB, ~50 ms), a 16-byte random salt and a
32-byte key. Loading refuses parameters outside sane bounds, so a hostile users file cannot
make each AUTH cost gigabytes of memory.

Users file: one `user:hash` per line; blank lines and lines starting with `#` are ignored;
the user name is everything before the first `:`. Errors read `file:line: message` and
never echo the hash.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HashFormatError",
    "Users",
    "UsersFileError",
    "hash_password",
    "load_users",
    "parse_users",
    "prompt_new_password_hash",
    "verify_password",
]

SCHEME = "scrypt"
DEFAULT_N = 2**14
DEFAULT_R = 8
DEFAULT_P = 1
SALT_BYTES = 16
KEY_BYTES = 32
# Upper bounds accepted when reading a hash: 128*r*N bytes of memory at most 256 MiB.
_MAX_MEMORY = 256 * 1024 * 1024
_MAX_P = 16
_MIN_KEY_BYTES = 16
_MAX_KEY_BYTES = 64


class HashFormatError(ValueError):
    """A stored hash is not `scrypt$N$r$p$salt_b64$hash_b64` with sane parameters."""


class UsersFileError(ValueError):
    """A users file could not be loaded; str() is `file:line: message`."""

    def __init__(self, source: str, line: int, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        super().__init__(f"{source}:{line}: {message}")


@dataclass(frozen=True, slots=True)
class _Params:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise HashFormatError("bad base64") from None


def _scrypt(password: str, params: _Params | tuple[int, int, int, bytes, int]) -> bytes:
    if isinstance(params, _Params):
        n, r, p, salt, dklen = params.n, params.r, params.p, params.salt, len(params.key)
    else:
        n, r, p, salt, dklen = params
    # OpenSSL's default maxmem (32 MiB) is below what r=8, N=2**15 needs; size it exactly.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=dklen
    )


def _check_cost(n: int, r: int, p: int) -> None:
    if n < 2 or n & (n - 1):
        raise HashFormatError("N must be a power of two >= 2")
    if r < 1 or p < 1 or p > _MAX_P or 128 * r * n > _MAX_MEMORY:
        raise HashFormatError("scrypt parameters out of bounds")


def _parse_hash(encoded: str) -> _Params:
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise HashFormatError("expected scrypt$N$r$p$salt_b64$hash_b64")
    try:
        n, r, p = (int(x, 10) for x in parts[1:4])
    except ValueError:
        raise HashFormatError("N, r and p must be decimal integers") from None
    _check_cost(n, r, p)
    salt = _unb64(parts[4])
    key = _unb64(parts[5])
    if len(salt) < 8:
        raise HashFormatError("salt too short")
    if not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise HashFormatError("derived key length out of bounds")
    return _Params(n, r, p, salt, key)


def hash_password(
    password: str,
    *,
    n: int = DEFAULT_N,
    r: int = DEFAULT_R,
    p: int = DEFAULT_P,
    salt: bytes | None = None,
) -> str:
    """Hash a password into the `scrypt$N$r$p$salt_b64$hash_b64` form."""
    if salt is None:
        salt = secrets.token_bytes(SALT_BYTES)
    if len(salt) < 8:
        raise HashFormatError("salt too short")
    _check_cost(n, r, p)  # the same bounds as loading: never write what we cannot read
    key = _scrypt(password, (n, r, p, salt, KEY_BYTES))
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, encoded: str) -> bool:
    """True if `password` matches `encoded`; constant-time comparison of the derived keys.

    Raises HashFormatError for a malformed hash (a configuration error, not a wrong
    password)."""
    params = _parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, params), params.key)


# Checked against when the user does not exist, so that a wrong user name costs the
# same scrypt work as a wrong password and timing does not reveal which users exist.
_DUMMY_HASH = f"{SCHEME}${DEFAULT_N}${DEFAULT_R}${DEFAULT_P}${_b64(b'x' * SALT_BYTES)}${_b64(b'y' * KEY_BYTES)}"


class Users:
    """The SMTP AUTH users: name → stored hash. `verify` is what an Intake calls."""

    __slots__ = ("_hashes",)

    def __init__(self, hashes: Mapping[str, str]) -> None:
        for encoded in hashes.values():
            _parse_hash(encoded)
        self._hashes = dict(hashes)

    def __contains__(self, user: object) -> bool:
        return user in self._hashes

    def __len__(self) -> int:
        return len(self._hashes)

    def __repr__(self) -> str:
        return f"Users({sorted(self._hashes)})"

    def verify(self, user: str, password: str) -> bool:
        encoded = self._hashes.get(user)
        if encoded is None:
            verify_password(password, _DUMMY_HASH)
            return False
        return verify_password(password, encoded)


def parse_users(text: str, *, source: str = "<users>") -> Users:
    """Parse users-file text; errors carry `source:line`."""
    hashes: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, encoded = line.partition(":")
        user = user.strip()
        encoded = encoded.strip()
        if not colon:
            raise UsersFileError(source, lineno, "expected 'user:hash'")
        if not user or any(c.isspace() for c in user):
            raise UsersFileError(source, lineno, "user name must be non-empty, without spaces")
        if user in hashes:
            raise UsersFileError(source, lineno, f"duplicate user {user!r}")
        try:
            _parse_hash(encoded)
        except HashFormatError as exc:
            raise UsersFileError(source, lineno, f"invalid hash for {user!r}: {exc}") from None
        hashes[user] = encoded
    return Users(hashes)


def load_users(path: str | os.PathLike[str]) -> Users:
    """Read and parse a users file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsersFileError(str(p), 1, f"not UTF-8: {exc.reason}") from None
    return parse_users(text, source=str(p))


def prompt_new_password_hash(ask: Callable[[str], str] | None = None) -> str:
    """Ask for a password twice (getpass by default) and return its hash.

    For `relay hash-password`: the CLI prints the returned string. Raises ValueError on
    an empty password or a mismatch."""
    if ask is None:
        import getpass

        ask = getpass.getpass
    first = ask("Password: ")
    if not first:
        raise ValueError("empty password")
    if ask("Repeat password: ") != first:
        raise ValueError("passwords do not match")
    return hash_password(first)
