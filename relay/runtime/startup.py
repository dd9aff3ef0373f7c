"""Start-up and reload checks of the runtime, and the one-line reasons a start fails.

`load_checked` is `load_config` plus what the configuration layer cannot judge itself (the
users file's contents are parsed by relay/smtp/users.py): `relay check`, `relay serve`, the
supervisor and every reload use it, so all of them refuse the same things with
`file:line: message`. `StartError` is an environment problem found while starting (a port in
use, a file that vanished since the check): `relay serve` logs it as one line and exits 1,
never with a traceback.
"""

from __future__ import annotations

import errno
import ssl
from pathlib import Path

from relay.config import ConfigErrors, load_config
from relay.config.errors import ConfigError
from relay.config.model import Config
from relay.runtime.settings import load_users
from relay.smtp.users import Users, UsersFileError


class StartError(Exception):
    """Why the relay cannot start, in one line for the operator."""


def load_checked(location: str | Path | None) -> tuple[Config, Users | None]:
    """The configuration and its users file, or ConfigErrors with every problem."""
    config = load_config(location)
    return config, checked_users(config)


def checked_users(config: Config) -> Users | None:
    """The users file of `config`, parsed; ConfigErrors (at the file's line) if it is bad."""
    try:
        return load_users(config)
    except UsersFileError as exc:
        raise ConfigErrors([ConfigError(exc.source, exc.line, exc.message)]) from None
    except OSError as exc:  # removed or made unreadable since relay/config checked it
        name = config.relay.clients.users_file
        raise ConfigErrors(
            [ConfigError(config.file, 1, f"users_file {name}: {exc.strerror or exc}")]
        ) from None


_ERRNO_TEXT = {
    errno.EADDRINUSE: "address already in use (is another relay or MTA running?)",
    errno.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
    errno.EADDRNOTAVAIL: "address not available (it is not configured on this machine)",
}


def why_not(exc: OSError) -> str:
    """An OSError from binding or loading, as words (no errno numbers, no traceback)."""
    if isinstance(exc, ssl.SSLError):
        return f"cannot load its certificate and key: {exc.reason or exc}"
    if exc.errno in _ERRNO_TEXT:
        return _ERRNO_TEXT[exc.errno]
    return exc.strerror or str(exc)


def cannot_listen(what: str, address: str, port: int, exc: OSError) -> StartError:
    """E.g. "listener smtp cannot listen on 127.0.0.1:25: address already in use (…)"."""
    if isinstance(exc, ssl.SSLError) or (exc.filename is not None):
        return StartError(f"{what}: {why_not(exc)}")
    return StartError(f"{what} cannot listen on {address}:{port}: {why_not(exc)}")
