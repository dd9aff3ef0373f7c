"""Which intake limits apply to a message: per client, organisation, account and sender.

Defaults come from `limits:` in relay.yaml; an organisation's file and a member's entry
override them field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.model import Config
from relay.config.schema import RateConf
from relay.policy.attribution import Attribution


@dataclass(frozen=True, slots=True)
class AppliedLimit:
    scope: str  # client | organisation | account | sender
    key: str
    per_minute: int | None
    per_hour: int | None
    per_day: int | None
    recipients_per_message: int | None

    def describe(self) -> str:
        parts = [
            f"{n} {getattr(self, f)}"
            for f, n in (
                ("per_minute", "/min"),
                ("per_hour", "/hour"),
                ("per_day", "/day"),
                ("recipients_per_message", "rcpt/msg"),
            )
            if getattr(self, f) is not None
        ]
        return ", ".join(parts) if parts else "unlimited"


def _merge(base: RateConf, override: RateConf | None) -> RateConf:
    if override is None:
        return base
    return base.model_copy(update=override.model_dump(exclude_none=True))


def _applied(scope: str, key: str, conf: RateConf) -> AppliedLimit:
    return AppliedLimit(
        scope, key, conf.per_minute, conf.per_hour, conf.per_day, conf.recipients_per_message
    )


def applicable_limits(
    config: Config, attribution: Attribution, sender: str, client: str
) -> list[AppliedLimit]:
    lim = config.relay.limits
    org = config.orgs.get(attribution.org)
    member = org.members.get(attribution.account) if org else None
    return [
        _applied("client", client, lim.client),
        _applied(
            "organisation", attribution.org, _merge(lim.organisation, org.limits if org else None)
        ),
        _applied(
            "account", attribution.account, _merge(lim.account, member.limits if member else None)
        ),
        _applied("sender", sender.lower() or "<>", lim.sender),
    ]
