"""Provider profiles (`provider:` of an upstream): the host, port, TLS mode, identity provider
and default throttles of the mailbox services customers use most, from their published
limits. Everything a profile fills in can be overridden in the upstream's own keys.

- microsoft365: Exchange Online SMTP AUTH client submission, smtp.office365.com:587
  STARTTLS. Limits: 30 messages per minute and 10,000 recipients per day per mailbox, and
  3 concurrent connections per mailbox (Exchange Online limits, "Sending limits").
- google-workspace: smtp.gmail.com:587 STARTTLS; 2,000 messages per day per user (Google
  Workspace "Gmail sending limits"; trial accounts have 500).
- gmail: smtp.gmail.com:587 STARTTLS; 500 messages per day (consumer accounts).
- google-smtp-relay: smtp-relay.gmail.com:587 STARTTLS (the Workspace SMTP relay service;
  authenticates by the relay's egress IP or by a user); 10,000 recipients per day per user.

The daily limits count recipients at the providers; the relay counts messages, so a
profile's `daily` is an upper bound that holds for one-recipient mail (invitations) and is
conservative for nothing else: lower it for mail with many recipients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Profile:
    host: str
    port: int
    tls: str
    idp: str
    throttle: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "microsoft365": Profile(
        "smtp.office365.com",
        587,
        "starttls",
        "microsoft",
        {"max_connections": 3, "quotas": [(30, 60)], "daily": 10_000},
    ),
    "google-workspace": Profile("smtp.gmail.com", 587, "starttls", "google", {"daily": 2_000}),
    "gmail": Profile("smtp.gmail.com", 587, "starttls", "google", {"daily": 500}),
    "google-smtp-relay": Profile(
        "smtp-relay.gmail.com", 587, "starttls", "google", {"daily": 10_000}
    ),
}


def throttle_defaults(provider: str | None, explicit: set[str]) -> dict[str, Any]:
    """The profile's throttle values for the keys the upstream did not set itself."""
    if provider is None:
        return {}
    return {k: v for k, v in PROFILES[provider].throttle.items() if k not in explicit}
