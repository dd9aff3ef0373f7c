"""The typed values that move between stages (listener → policy → spool → scheduler → delivery).

Every stage imports these and nothing of another stage's internals, so each stage can be
read and tested alone. Values here are plain frozen dataclasses: no I/O, no behaviour
beyond small derived properties.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from relay.core.dsn import DsnParams


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
    # How it logs in: "password" (PLAIN/LOGIN with username + password), "xoauth2" (an
    # OAuth 2.0 access token for `username`, from `oauth`), or "none".
    auth: str = "password"
    oauth: OAuthSettings | None = None
    provider: str | None = None  # microsoft365, google-workspace, gmail, google-smtp-relay, ...
    # verify: true carries no mail until `relay verify-upstream` confirmed it; `previous`
    # names the upstream its mail takes meanwhile. `fingerprint` changes with host, port,
    # user or credentials (which makes it unverified again).
    verify: bool = False
    previous: str | None = None
    fingerprint: str = ""
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
    dsn: DsnParams | None = None  # RFC 3461 RET/ENVID/NOTIFY/ORCPT, when the client gave any
    # `data` is wire-ready: CRLF lines only, none starting with ".", ending in CRLF (the
    # listener checked the lines and found no dot-stuffed one), so delivery needs no scan.
    wire: bool = False


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
    # Set when the reply means the whole upstream must wait for a person (credentials,
    # configuration, a daily sending limit): the scheduler pauses it instead of retrying each message.
    pause: UpstreamPause | None = None
    tls: str | None = None  # the TLS version the transaction ran under ("TLSv1.3"), if any


@dataclass(frozen=True, slots=True)
class UpstreamPause:
    """Why an upstream stops carrying mail for a while (relay.delivery.providers decides)."""

    kind: str  # auth, policy, rate (relay/delivery/replyclass.py's vocabulary)
    reason: str  # the upstream's (or identity provider's) own words
    next_step: str  # what a person should do, plainly
    seconds: float | None = None  # None: until fixed (a test, a delivery or a reload clears it)


# -- OAuth 2.0 (auth: xoauth2): built by relay.config, used by relay.oauth and delivery ----

class IdentityProvider(StrEnum):
    MICROSOFT = "microsoft"  # Microsoft Entra ID (Microsoft 365, Exchange Online)
    GOOGLE = "google"  # Google Workspace, Gmail


class Flow(StrEnum):
    CLIENT_CREDENTIALS = "client_credentials"  # Entra app-only: secret or certificate
    SERVICE_ACCOUNT = "service_account"  # Google: service account, domain-wide delegation
    REFRESH_TOKEN = "refresh_token"  # delegated: a user's consent, either provider


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    idp: IdentityProvider
    flow: Flow
    token_endpoint: str  # the IdP's token URL (overridable: national clouds, tests)
    scope: str
    tenant: str | None = None  # Entra tenant id or domain
    client_id: str | None = None
    client_secret: Secret | None = None
    certificate_key: Secret | None = None  # PEM private key (Entra certificate credential)
    certificate_thumbprint: str | None = None  # hex SHA-1 of the certificate
    service_account_key: Secret | None = None  # Google's JSON key
    refresh_token: Secret | None = None  # the first refresh token (rotations are kept by us)
    ca_file: str | None = None  # a private CA for the token endpoint (tests); else the system's
    timeout: float = 30.0  # per token request

    def secrets(self) -> list[Secret]:
        return [
            s
            for s in (
                self.client_secret,
                self.certificate_key,
                self.service_account_key,
                self.refresh_token,
            )
            if s is not None
        ]

    def describe(self) -> str:
        """Who asks whom, for people (no secret)."""
        who = f"client {self.client_id}" if self.client_id else "service account"
        tenant = f" tenant {self.tenant}" if self.tenant else ""
        return f"{self.idp.value} {self.flow.value} ({who}{tenant}) at {self.token_endpoint}"
