"""The strict schema of `relay.yaml` and of `policies/*.yaml` (pydantic, unknown keys forbidden).

Defaults live here and only here. Cross-references (an upstream naming an undefined pool,
two organisations claiming one domain, …) are checked in `relay.config.build`, which can see
every file at once.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from relay.config.notify import (
    DsnConf,
    EventsConf,
    OrgDsnConf,
    SuppressionConf,
    WebhookConf,
)
from relay.config.units import parse_duration, parse_size

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(ge=1)]
SECRET_PREFIXES = ("env:", "file:", "credential:")


def _ip(value: str) -> str:
    return str(ipaddress.ip_address(value))


def _network(value: str) -> str:
    return str(ipaddress.ip_network(value, strict=False))


def _secret_ref(value: str) -> str:
    if not value.startswith(SECRET_PREFIXES) or value.partition(":")[2] == "":
        # The value itself is never echoed: it may be a pasted password.
        raise ValueError(
            "a password must be a reference (env:NAME, file:/path or credential:NAME);"
            " literal secrets are not allowed in YAML"
        )
    return value


def _hostname(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    label = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
    if len(value) > 253 or not re.fullmatch(rf"{label}(\.{label})*\.?", value):
        raise ValueError(f"'{value}' is not a valid host name or IP address")
    return value.rstrip(".").lower()


_QUOTA = re.compile(r"^\s*(\d+)\s+per\s+(\S+)\s*$")


def _quota(value: object) -> tuple[int, int]:
    """'500 per 10m' → (500, 600): a message quota over a window of whole seconds."""
    if isinstance(value, str) and (m := _QUOTA.match(value)):
        count, seconds = int(m.group(1)), parse_duration(m.group(2))
        if count >= 1 and seconds >= 1 and seconds == int(seconds):
            return count, int(seconds)
    raise ValueError(
        f"'{value}' is not a quota (use 'COUNT per DURATION', e.g. '500 per 10m';"
        " a count of at least 1 over whole seconds)"
    )


def _mailbox(value: str) -> str:
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c in value for c in " \r\n\t<>,;"):
        raise ValueError(f"'{value}' is not an email address (local@domain)")
    return f"{local}@{_hostname(domain)}"


IPAddress = Annotated[str, AfterValidator(_ip)]
Network = Annotated[str, AfterValidator(_network)]
SecretRef = Annotated[str, AfterValidator(_secret_ref)]
HostName = Annotated[str, AfterValidator(_hostname)]
Quota = Annotated[tuple[int, int], BeforeValidator(_quota)]
Mailbox = Annotated[str, AfterValidator(_mailbox)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerConf(Strict):
    name: Name = "smtp"
    address: IPAddress = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 2525
    tls: Literal["none", "starttls", "implicit"] = "none"
    cert_file: str | None = None
    key_file: str | None = None
    require_tls: bool = False
    require_auth: bool = False
    max_message_size: Size = 35 * 1024 * 1024
    max_recipients: PositiveInt = 1000
    idle_timeout: Duration = 300.0
    session_timeout: Duration = 1800.0
    max_errors: PositiveInt = 10
    # PROXY protocol v1/v2 (HAProxy, cloud TCP balancers): the client address is the one the
    # balancer names; only connections from proxy_from, which must all send the header.
    proxy_protocol: bool = False
    proxy_from: list[Network] = Field(default_factory=list)

    @model_validator(mode="after")
    def _proxy_needs_balancers(self) -> ListenerConf:
        if self.proxy_protocol and not self.proxy_from:
            raise ValueError("proxy_protocol: true needs proxy_from (the balancers' addresses)")
        if self.proxy_protocol and self.tls == "implicit":
            raise ValueError("proxy_protocol cannot be used with tls: implicit (the header"
                             " comes before TLS); use tls: starttls or terminate TLS earlier")
        return self


class ClientsConf(Strict):
    networks: list[Network] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    users_file: str | None = None


class SourceConf(Strict):
    address: IPAddress
    ehlo: HostName


class ThrottleConf(Strict):
    max_connections: PositiveInt | None = None
    min_interval: Duration = 0.0
    max_messages_per_connection: PositiveInt | None = None
    hourly: PositiveInt | None = None
    daily: PositiveInt | None = None
    # Further quotas over any window, e.g. ["500 per 10m"]; hourly/daily are the same thing
    # over 1h and 1d. All are fixed windows that start with the first message (relay.limits).
    quotas: list[Quota] = Field(default_factory=list)


class OAuthConf(Strict):
    """`oauth:` of an upstream with `auth: xoauth2` (relay/config/oauth.py checks the flow)."""

    idp: Literal["microsoft", "google"] | None = None  # default: from the provider profile
    flow: Literal["client_credentials", "service_account", "refresh_token"] | None = None
    tenant: str | None = None
    client_id: str | None = None
    client_secret: SecretRef | None = None
    certificate_key: SecretRef | None = None
    certificate_thumbprint: Annotated[str, Field(pattern=r"^[0-9A-Fa-f:]{40,59}$")] | None = None
    service_account_key: SecretRef | None = None
    refresh_token: SecretRef | None = None
    token_endpoint: Annotated[str, Field(pattern=r"^https://\S+$")] | None = None
    scope: str | None = None
    ca_file: str | None = None
    timeout: Duration = 30.0


class UpstreamConf(Strict):
    preset: Literal["sendgrid", "mailjet"] | None = None
    # A provider profile fills host, port, TLS and throttles (relay/config/providers.py).
    provider: Literal["microsoft365", "google-workspace", "gmail", "google-smtp-relay"] | None = None
    auth: Literal["password", "xoauth2", "none"] | None = None  # default: password if given
    oauth: OAuthConf | None = None
    verify: bool = False  # carries no mail until `relay verify-upstream` confirmed it
    previous: Name | None = None  # where its mail goes until then (default: the next rule)
    host: HostName | None = None
    port: Port | None = None
    tls: Literal["implicit", "starttls", "none"] | None = None
    allow_plaintext: bool = False
    allow_tls_port_mismatch: bool = False
    username: str | None = None
    password: SecretRef | None = None
    from_address: Mailbox | None = None
    pool: Name | None = None
    verify_tls: bool = True
    ca_file: str | None = None
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 60.0
    data_timeout: Duration = 600.0  # the reply to the final "." (RFC 5321 § 4.5.3.2.6)
    throttle: ThrottleConf = Field(default_factory=ThrottleConf)
    # Where it processes mail, for organisations bound to a region (presets: sendgrid us,
    # mailjet eu); any name, compared as written.
    region: Name | None = None


class RateConf(Strict):
    """Intake limits. Counts are messages (per_*) or recipients in one message."""

    per_minute: PositiveInt | None = None
    per_hour: PositiveInt | None = None
    per_day: PositiveInt | None = None
    recipients_per_message: PositiveInt | None = None
    max_connections: PositiveInt | None = None  # clients only


class LimitsConf(Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    on_backend_failure: Literal["local", "tempfail"] = "local"
    node_id: Name | None = None  # names this node's leases in Redis; default host-pid
    redis_timeout: Duration = 0.5  # per Redis operation: a dead Redis is noticed fast
    redis_retry: Duration = 5.0  # while degraded, how often Redis is tried again
    # While Redis is unreachable (on_backend_failure: local) each node enforces this share
    # of every shared limit on its own (set it to 1/number of nodes).
    fallback_share: Annotated[float, Field(gt=0.0, le=1.0)] = 0.5
    lease_ttl: Duration = 30.0  # a crashed node's concurrency slots free up after this
    slow_down_initial: Duration = 30.0  # first pause after an upstream's rate-limit reply
    slow_down_max: Duration = 900.0  # the pause doubles per repeat, up to this
    client: RateConf = Field(default_factory=RateConf)
    organisation: RateConf = Field(default_factory=RateConf)
    account: RateConf = Field(default_factory=RateConf)
    sender: RateConf = Field(default_factory=RateConf)


class AttributionConf(Strict):
    org_header: str = "X-Relay-Org"
    account_header: str = "X-Relay-Account"
    default_org: Name = "default"


class SpoolConf(Strict):
    path: str = "var/spool"
    # Queued messages the scheduler keeps in memory at once (about 0.7 KB each); the rest wait
    # only in the spool and are loaded in due order as room frees (like Postfix's
    # qmgr_message_active_limit). Bounds the relay's memory however large the queue grows.
    active_messages: Annotated[int, Field(ge=1)] = 20_000
    # When several sessions are writing at once, the spool writer waits this long for more
    # before it commits: fewer fsyncs and WAL pages per message (~10% less CPU at 5 KB) for
    # about this much on the reply after DATA. A lone message never waits. 0 turns it off.
    commit_gather: Annotated[Duration, Field(ge=0.0, le=0.05)] = 0.002


class RetryConf(Strict):
    schedule: list[Duration] = Field(
        default_factory=lambda: [60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0]
    )
    jitter: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2
    max_age: Duration = 5 * 86400.0

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value or any(v <= 0 for v in value):
            raise ValueError("the retry schedule needs at least one positive delay")
        return value


class AdminConf(Strict):
    enabled: bool = True
    address: IPAddress = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8025
    token: SecretRef | None = None


class DnsConf(Strict):
    """Upstream name resolution. `hosts` pins names to addresses without DNS (like /etc/hosts)."""

    hosts: dict[HostName, list[IPAddress]] = Field(default_factory=dict)
    timeout: Duration = 5.0


class LogConf(Strict):
    mail_log: str = "-"  # "-" = standard error, else a file path
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"  # the relay's own log on stderr (the journal)


class RelayConf(Strict):
    hostname: HostName = "localhost"
    # Where RCPT TO:<Postmaster> (no domain, RFC 5321 § 4.5.1) goes; default postmaster@hostname.
    postmaster: Mailbox | None = None
    # Worker processes sharing the listening sockets, each with its own spool shard,
    # scheduler and deliverer ("auto" = one per CPU). See relay/runtime/supervisor.py.
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = 1
    policies: str = "policies"  # directory of organisation files, relative to this file
    listeners: list[ListenerConf] = Field(default_factory=lambda: [ListenerConf()])
    clients: ClientsConf = Field(default_factory=ClientsConf)
    egress_sources: dict[Name, SourceConf] = Field(
        default_factory=lambda: {"local": SourceConf(address="127.0.0.1", ehlo="localhost")}
    )
    egress_pools: dict[Name, list[Name]] = Field(default_factory=lambda: {"default": ["local"]})
    default_pool: Name = "default"
    upstreams: dict[Name, UpstreamConf] = Field(default_factory=dict)
    default_upstream: Name | None = None
    attribution: AttributionConf = Field(default_factory=AttributionConf)
    spool: SpoolConf = Field(default_factory=SpoolConf)
    retry: RetryConf = Field(default_factory=RetryConf)
    limits: LimitsConf = Field(default_factory=LimitsConf)
    admin: AdminConf = Field(default_factory=AdminConf)
    dns: DnsConf = Field(default_factory=DnsConf)
    log: LogConf = Field(default_factory=LogConf)
    events: EventsConf = Field(default_factory=EventsConf)
    webhooks: dict[Name, WebhookConf] = Field(default_factory=dict)
    dsn: DsnConf = Field(default_factory=DsnConf)


class MemberConf(Strict):
    upstream: Name | None = None
    limits: RateConf = Field(default_factory=RateConf)


class OrgConf(Strict):
    org: Name
    name: str | None = None
    domains: list[HostName] = Field(default_factory=list)
    upstream: Name | None = None
    enforce: bool = False
    pool: Name | None = None
    upstreams: dict[Name, UpstreamConf] = Field(default_factory=dict)
    members: dict[Mailbox, MemberConf] = Field(default_factory=dict)
    limits: RateConf = Field(default_factory=RateConf)
    # Failover (relay/policy/failover.py), off unless upstreams are listed: the next one
    # takes a message once its own upstream has been unusable for failover_after, or after
    # failover_after_deferrals deferrals of the message.
    failover: list[Name] = Field(default_factory=list)
    failover_after: Duration = 600.0
    failover_after_deferrals: PositiveInt | None = None
    region: Name | None = None  # bound to a region: no failover outside it unless allowed
    failover_outside_region: bool = False
    failover_from_own_servers: bool = False  # may mail leave the organisation's own server?
    # DKIM selectors published for the domains (`relay check-domain`); default: the
    # upstream's usual ones (SendGrid s1, s2; Mailjet mailjet), none for a customer server.
    dkim_selectors: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")]] = (
        Field(default_factory=list)
    )
    webhooks: dict[Name, WebhookConf] = Field(default_factory=dict)
    dsn: OrgDsnConf = Field(default_factory=OrgDsnConf)
    suppression: SuppressionConf = Field(default_factory=SuppressionConf)
