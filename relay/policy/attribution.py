"""Attribution: which organisation and account a message belongs to (docs/architecture.md, in order).

1. trusted tag headers (X-Relay-Org / X-Relay-Account), set by the platform;
2. the sender address as a member account of an organisation;
3. the sender domain (or a parent domain) as owned by an organisation;
4. the global default organisation.
Tags reach us only from allowlisted or authenticated clients (the listener refuses anyone
else before DATA), and are removed before relaying. A tag naming an unknown organisation is
ignored (noted in the rule) rather than refusing mail: the sender still identifies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.model import Config


@dataclass(frozen=True, slots=True)
class Attribution:
    org: str
    account: str
    rule: str  # which step decided, in words an admin can read


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def attribute(
    config: Config, sender: str, *, tag_org: str | None = None, tag_account: str | None = None
) -> Attribution:
    notes = ""
    sender_l = sender.strip().lower()
    account_l = tag_account.strip().lower() if tag_account else None
    if tag_org:
        tag_org = tag_org.strip()
        if tag_org in config.orgs:
            account = account_l or sender_l or "<>"
            return Attribution(
                tag_org, account, f"tag header {config.relay.attribution.org_header}"
            )
        notes = f" (tag {config.relay.attribution.org_header}: '{tag_org}' names no organisation)"
    if account_l:
        org = config.account_index.get(account_l) or config.org_of_domain(_domain(account_l))
        if org:
            return Attribution(
                org, account_l, f"tag header {config.relay.attribution.account_header}{notes}"
            )
    if sender_l:
        org = config.account_index.get(sender_l)
        if org:
            return Attribution(org, sender_l, f"sender {sender_l} is a member of {org}{notes}")
        org = config.org_of_domain(_domain(sender_l))
        if org:
            return Attribution(
                org, sender_l, f"sender domain {_domain(sender_l)} belongs to {org}{notes}"
            )
    default = config.relay.attribution.default_org
    return Attribution(
        default, account_l or sender_l or "<>", f"no organisation matched: default{notes}"
    )
