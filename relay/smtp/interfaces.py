"""What the SMTP server needs from the rest of the relay, and what it tells it: the `Intake`
behind every check and the spool put, the client's `SessionInfo`, a listener's settings,
and the `SessionOwner` a session reports to (the Listener)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from relay.core.model import Envelope, TlsMode


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the intake may know about the client when it decides."""

    peer_ip: str
    peer_port: int
    helo: str
    tls: bool
    user: str | None  # authenticated identity
    listener: str = ""  # the name of the listener that accepted the connection


class Intake(Protocol):
    """The policy+spool side of the listener. Raise a RelayError to refuse.

    `authenticate` runs in a worker thread (asyncio.to_thread) so that a slow password
    hash does not stall every other session: it must be thread-safe (a lookup and a hash
    check are)."""

    def check_connect(self, peer_ip: str) -> None: ...

    def authenticate(self, session: SessionInfo, user: str, password: str) -> bool: ...

    def check_sender(self, session: SessionInfo, sender: str) -> None: ...

    def check_recipient(self, session: SessionInfo, sender: str, rcpt: str) -> None: ...

    async def submit(self, session: SessionInfo, envelope: Envelope) -> str: ...


@runtime_checkable
class ConnectionObserver(Protocol):
    """Optional for an Intake: told when a connection that passed check_connect ends (so
    it can count concurrent connections per client)."""

    def connection_closed(self, peer_ip: str) -> None: ...


@dataclass(frozen=True)
class ListenerSettings:
    name: str
    address: str
    port: int  # 0 = ephemeral (tests)
    tls: TlsMode  # NONE plain; STARTTLS offered (require_tls makes it mandatory); IMPLICIT
    cert_file: str | None = None
    key_file: str | None = None
    hostname: str = "localhost"  # greeting banner and Received
    require_tls: bool = False  # STARTTLS listeners: no MAIL before STARTTLS (530 5.7.0)
    require_auth: bool = False  # even allowlisted networks must AUTH
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 1000
    max_line_length: int = 1000  # RFC 5321 § 4.5.3.1.6 text line incl. CRLF
    max_command_length: int = 512  # RFC 5321 § 4.5.3.1.4
    idle_timeout: float = 300.0  # per command (RFC 5321 § 4.5.3.2.7: 5 minutes)
    session_timeout: float = 1800.0  # whole connection
    max_errors: int = 10  # bad commands before 421 4.7.0 and disconnect
    max_auth_failures: int = 3  # then 421 4.7.0 and disconnect
    postmaster: str = "postmaster@localhost"  # RCPT TO:<Postmaster> goes here (RFC 5321 § 4.5.1)
    # Networks of the load balancers that send a PROXY protocol header; empty: no PROXY.
    proxy_from: tuple[str, ...] = ()


class SessionOwner(Protocol):
    """What a session needs from the listener that accepted it (relay.smtp.server.Listener):
    its settings and logger, the current intake (a reload may replace it) and the list of
    open sessions that a graceful stop waits for."""

    settings: ListenerSettings
    log: logging.Logger

    @property
    def intake(self) -> Intake: ...

    def register(self, session: object) -> None: ...

    def unregister(self, session: object) -> None: ...


_OBSERVER_TYPES: dict[type, bool] = {}


def is_observer(intake: Intake) -> bool:
    """isinstance(intake, ConnectionObserver), once per class: a runtime-checkable
    Protocol's isinstance inspects the class's members on every call."""
    cls = type(intake)
    known = _OBSERVER_TYPES.get(cls)
    if known is None:
        known = _OBSERVER_TYPES[cls] = isinstance(intake, ConnectionObserver)
    return known
