"""The schema of what the platform is told (issue 13): events, webhooks, where DSNs go,
suppression. Part of `relay.yaml` (`events`, `webhooks`, `dsn`) and of each organisation
file (`webhooks`, `dsn`, `suppression`); checked across files in `relay.config.build`."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from relay.config.units import parse_duration

Duration = Annotated[float, BeforeValidator(parse_duration)]

EventType = Literal[
    "received", "delivered", "deferred", "bounced", "expired", "suppressed",
    "held", "released", "retried", "deleted", "dsn_queued", "dsn_failed",
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]
FailureClass = Literal["hard", "soft", "auth", "policy", "spam", "quota", "rate", "dns",
                       "network", "tls", "expired"]


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError(f"'{value}' is not an https:// URL (webhooks are only sent over TLS)")
    if parts.username or parts.password:
        raise ValueError("a webhook URL must not carry credentials; use `secret` (a reference)")
    return value


def _secret_ref(value: str) -> str:
    if not value.startswith(("env:", "file:", "credential:")) or value.partition(":")[2] == "":
        raise ValueError(
            "a secret must be a reference (env:NAME, file:/path or credential:NAME);"
            " literal secrets are not allowed in YAML"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookConf(_Strict):
    """One endpoint: events are POSTed in batches, signed with HMAC-SHA256 (README)."""

    url: Annotated[str, AfterValidator(_https_url)]
    secret: Annotated[str, AfterValidator(_secret_ref)]
    events: list[EventType] = Field(default_factory=lambda: list(EVENT_TYPES))  # type: ignore[arg-type]
    batch_size: Annotated[int, Field(ge=1, le=1000)] = 100
    timeout: Duration = 10.0
    verify_tls: bool = True
    ca_file: str | None = None
    retry_initial: Duration = 1.0  # first wait after a failed call; doubles while it fails
    retry_max: Duration = 300.0
    # The outbox of this endpoint (in the spool): past either bound the oldest waiting
    # events are skipped for it (counted, logged; `relay events replay` can resend them
    # while the event log keeps them).
    max_backlog: Annotated[int, Field(ge=1)] = 500_000
    max_age: Duration = 3 * 86400.0


class EventsConf(_Strict):
    retention: Duration = 7 * 86400.0  # events (and so traces) older than this are pruned
    max_events: Annotated[int, Field(ge=1000)] = 5_000_000  # per spool shard


class DsnConf(_Strict):
    upstream: str | None = None  # the upstream DSNs go out through; default: default_upstream


class OrgDsnConf(_Strict):
    enabled: bool = True  # false: no DSNs for this organisation (needs a webhook)
    upstream: str | None = None  # one of its own upstreams or a global one


class SuppressionConf(_Strict):
    enabled: bool = False
    classes: list[FailureClass] = Field(default_factory=lambda: ["hard"])  # type: ignore[arg-type]
    duration: Duration = 30 * 86400.0
