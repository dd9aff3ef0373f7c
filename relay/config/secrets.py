"""Resolve secret references (`env:NAME`, `file:/path`, `credential:NAME`) to `Secret` values.

A reference that cannot be resolved is not fatal to the whole relay: one customer's missing
credential file must not stop everyone's mail. The upstream that needs it is marked
unavailable (its mail waits in the queue, deferred with a clear reason) and `relay check`
reports it. Error texts name the reference, never a value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from relay.core.model import Secret

SECRET_PREFIXES = ("env:", "file:", "credential:")


class SecretUnavailable(Exception):
    """The reference points at nothing readable. The message is safe to log."""


def is_reference(value: str) -> bool:
    return value.startswith(SECRET_PREFIXES)


def resolve_secret(ref: str, *, base_dir: Path, environ: Mapping[str, str] | None = None) -> Secret:
    env = os.environ if environ is None else environ
    kind, _, name = ref.partition(":")
    if kind == "env":
        value = env.get(name)
        if not value:
            raise SecretUnavailable(f"environment variable {name} is not set")
        return Secret(value, ref)
    if kind == "file":
        path = Path(name)
        return Secret(_read(path if path.is_absolute() else base_dir / path, ref), ref)
    if kind == "credential":
        # systemd LoadCredential= puts each credential in $CREDENTIALS_DIRECTORY/NAME.
        cred_dir = env.get("CREDENTIALS_DIRECTORY")
        if not cred_dir:
            raise SecretUnavailable(
                f"{ref}: CREDENTIALS_DIRECTORY is not set (not run by systemd?)"
            )
        return Secret(_read(Path(cred_dir) / name, ref), ref)
    raise SecretUnavailable(f"unknown secret reference kind '{kind}'")


def _read(path: Path, ref: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise SecretUnavailable(f"{ref}: cannot read {path}: {exc.strerror}") from None
    if not value:
        raise SecretUnavailable(f"{ref}: {path} is empty")
    return value
