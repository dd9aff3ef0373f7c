"""The typed values that move between stages (listener → policy → spool → scheduler → delivery).

Every stage imports these and nothing of another stage's internals, so each stage can be
read and tested alone. Values here are plain frozen dataclasses: no I/O, no behaviour
beyond small derived properties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Secret:
    """A credential resolved from env/file/systemd credential. Never prints its value."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source  # e.g. "env:SENDGRID_API_KEY": safe to show

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.source})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class TlsMode(StrEnum):
    IMPLICIT = "implicit"  # TLS from the first byte (SMTPS, usually port 465)
    STARTTLS = "starttls"  # plain connect, then STARTTLS (required, never optional)
    NONE = "none"  # plaintext; only when the upstream says allow_plaintext: true


@dataclass(frozen=True, slots=True)
class EgressSource:
    """One published egress address and the name the relay greets (EHLO) with from it."""

    name: str
    address: str  # IPv4 or IPv6 literal
    ehlo: str

    @property
    def family(self) -> int:
        import socket

        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


@dataclass(frozen=True, slots=True)
class EgressPool:
    name: str
    sources: tuple[EgressSource, ...]


@dataclass(frozen=True, slots=True)
class Throttle:
    """How fast an upstream may be fed. None means no cap."""

    max_connections: int | None = None
    min_interval: float = 0.0  # seconds between message starts, across the upstream
    max_messages_per_connection: int | None = None
    hourly: int | None = None
    daily: int | None = None
    quotas: tuple[tuple[int, int], ...] = ()  # (messages, window seconds), beyond hourly/daily


@dataclass(frozen=True, slots=True)
class Upstream:
    """Everything delivery needs to reach one upstream. `id` is unique across the config:
    global upstreams use their name ("sendgrid"), an organisation's own use "org/name"."""

    id: str
    host: str
    port: int
    tls: TlsMode
    pool: str
    username: str | None = None
    password: Secret | None = None
    from_address: str | None = None  # envelope sender the server expects; rewrite to it
    verify_tls: bool = True
    ca_file: str | None = None
    throttle: Throttle = field(default_factory=Throttle)
    connect_timeout: float = 30.0
    command_timeout: float = (
        60.0  # per SMTP command; DATA end waits up to 10 min (RFC 5321 § 4.5.3.2.6)
    )
    data_timeout: float = 600.0  # DATA: the 354 and the reply to the final "."
    # Set when the upstream cannot be used as configured (e.g. its credential is missing):
    # mail routed to it waits in the queue, deferred with this reason, until a reload fixes it.
    unavailable: str | None = None
    region: str | None = None  # where it processes mail (failover of region-bound orgs)

    @property
    def pool_key(self) -> tuple[str, int, str, str]:
        """Connections are only shared between deliveries with this same key (plus source)."""
        return (self.host.lower(), self.port, self.tls.value, self.username or "")


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the listener accepted: the SMTP envelope and the raw message bytes (CRLF lines)."""

    sender: str  # "" for the null reverse-path <>
    recipients: tuple[str, ...]
    data: bytes
    client_ip: str
    client_user: str | None = None  # SMTP AUTH identity, if any
    helo: str = ""
    smtputf8: bool = False
    body_8bit: bool = False


class Disposition(StrEnum):
    """Mail-log event kinds (KumoMTA's vocabulary, one word each)."""

    RECEIVED = "received"
    REJECTED = "rejected"
    QUEUED = "queued"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx
    DEFERRED = "deferred"  # 4xx, timeout, connection trouble: try again later
    BOUNCED = "bounced"  # 5xx: permanent


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply as the peer sent it (or as we synthesised it for a network failure)."""

    code: int
    text: str  # the peer's own text, enhanced code included when it sent one
    enhanced: str | None = None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: str
    outcome: Outcome
    reply: Reply
    # True when the upstream said "slow down" (421, 4.7.x throttling): the scheduler backs
    # off the whole upstream, not just this message.
    throttled: bool = False
