"""What the running parts take from a loaded Config: listener settings, the users file, the
mail log's path and the admin token (re-read from its reference at each call)."""

from __future__ import annotations

from pathlib import Path

from relay.config.model import Config
from relay.config.secrets import SecretUnavailable, resolve_secret
from relay.core.model import TlsMode
from relay.oauth import FileShare, RedisShare, TokenBroker
from relay.smtp.server import ListenerSettings
from relay.smtp.users import Users
from relay.smtp.users import load_users as read_users


def listener_settings(config: Config) -> list[ListenerSettings]:
    out = []
    for lc in config.relay.listeners:
        def path(p: str | None) -> str | None:
            return None if p is None else str(p if Path(p).is_absolute() else config.base_dir / p)

        out.append(ListenerSettings(
            name=lc.name, address=lc.address, port=lc.port, tls=TlsMode(lc.tls),
            cert_file=path(lc.cert_file), key_file=path(lc.key_file), hostname=config.hostname,
            require_tls=lc.require_tls, require_auth=lc.require_auth,
            max_message_size=lc.max_message_size, max_recipients=lc.max_recipients,
            idle_timeout=lc.idle_timeout, session_timeout=lc.session_timeout, max_errors=lc.max_errors,
            postmaster=config.relay.postmaster or f"postmaster@{config.hostname}",
            proxy_from=tuple(lc.proxy_from) if lc.proxy_protocol else (),
        ))
    return out


def load_users(config: Config) -> Users | None:
    f = config.relay.clients.users_file
    if not f:
        return None
    p = Path(f)
    return read_users(p if p.is_absolute() else config.base_dir / p)


def mail_log_path(config: Config) -> str:
    target = config.relay.log.mail_log
    if target == "-" or Path(target).is_absolute():
        return target
    return str(config.base_dir / target)


def admin_token(config: Config) -> str | None:
    """The admin API token, re-read from its reference (None: open endpoints only)."""
    ref = config.relay.admin.token
    if not ref:
        return None
    try:
        return resolve_secret(ref, base_dir=config.base_dir).reveal()
    except SecretUnavailable:
        return None  # `relay check` warned; the API then fails closed (403)


def token_broker(config: Config) -> TokenBroker:
    """OAuth access tokens (auth: xoauth2), shared by the workers of this machine through
    files under the (unsharded) spool directory, and between nodes through Redis when the
    limits backend is Redis."""
    files = FileShare(config.spool_path / "oauth")
    lim = config.relay.limits
    if lim.backend == "redis" and lim.redis_url:
        return TokenBroker(RedisShare(lim.redis_url, files, timeout=lim.redis_timeout))
    return TokenBroker(files)
