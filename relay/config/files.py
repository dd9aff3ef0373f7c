"""The files a running relay will open, checked whenever a configuration is loaded (`relay
check`, `relay serve`, every reload): each listener's certificate and key (readable, and the
pair loads), the users file (readable), an upstream's ca_file (loads as a CA bundle) and the
mail log's directory (writable). A problem is reported at the line of the key naming the
file, so that a start or a reload fails with `file:line: message` instead of a traceback
later. The users file's *contents* are checked by relay/runtime/preflight.py (the parser
belongs to the SMTP layer).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from relay.config.errors import ConfigError
from relay.config.schema import RelayConf
from relay.config.yamlsrc import Located
from relay.config.yamlsrc import Path as YPath


def resolve(base_dir: Path, name: str) -> Path:
    """A configured file name: absolute, or relative to the directory of relay.yaml."""
    p = Path(name)
    return p if p.is_absolute() else base_dir / p


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None when it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except IsADirectoryError:
        return "is a directory"
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def pair_problem(cert: Path, key: Path) -> str | None:
    """Why this certificate chain and private key do not load together, or None."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        return exc.reason or exc.strerror or str(exc)
    except (OSError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    return None


def check_files(relay: RelayConf, src: Located, base_dir: Path) -> list[ConfigError]:
    errors: list[ConfigError] = []

    def err(path: YPath, message: str) -> None:
        errors.append(ConfigError(src.file, src.line_of(path), message))

    for i, lst in enumerate(relay.listeners):
        if lst.tls == "none" or not (lst.cert_file and lst.key_file):
            continue  # no TLS, or the missing key is reported by the builder
        cert, key = resolve(base_dir, lst.cert_file), resolve(base_dir, lst.key_file)
        bad = False
        for field, path in (("cert_file", cert), ("key_file", key)):
            why = unreadable(path)
            if why is not None:
                bad = True
                err(("listeners", i, field), f"listener '{lst.name}': {field} {path}: {why}")
        if not bad:
            why = pair_problem(cert, key)
            if why is not None:
                err(
                    ("listeners", i, "cert_file"),
                    f"listener '{lst.name}': cert_file and key_file do not load as a"
                    f" certificate and its key: {why}",
                )
    users = relay.clients.users_file
    if users:
        path = resolve(base_dir, users)
        why = unreadable(path)
        if why is not None:
            err(("clients", "users_file"), f"users_file {path}: {why}")
    log = relay.log.mail_log
    if log != "-":
        path = resolve(base_dir, log)
        where = path if path.exists() else path.parent
        if not where.exists():
            err(("log", "mail_log"), f"mail_log {path}: directory {where} does not exist")
        elif not os.access(where, os.W_OK):
            err(("log", "mail_log"), f"mail_log {path}: {where} is not writable")
    for name, up in relay.upstreams.items():
        if up.ca_file and resolve(base_dir, up.ca_file).exists():
            why = ca_problem(resolve(base_dir, up.ca_file))
            if why is not None:
                err(("upstreams", name, "ca_file"), f"upstream '{name}': ca_file: {why}")
    return errors


def ca_problem(path: Path) -> str | None:
    """Why `path` does not load as a bundle of CA certificates, or None."""
    why = unreadable(path)
    if why is not None:
        return f"{path}: {why}"
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        return f"{path} is not a PEM bundle of certificates ({exc.reason or exc})"
    except (OSError, ValueError) as exc:
        return f"{path}: {getattr(exc, 'strerror', None) or exc}"
    return None
