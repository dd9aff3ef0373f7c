"""The validated, cross-checked configuration that the rest of the relay reads (immutable)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from relay.config.notify import OrgDsnConf, SuppressionConf, WebhookConf
from relay.config.schema import RateConf, RelayConf
from relay.core.model import EgressPool, EgressSource, Upstream


@dataclass(frozen=True, slots=True)
class Member:
    account: str
    upstream: str | None  # resolved upstream id
    limits: RateConf


@dataclass(frozen=True, slots=True)
class Org:
    id: str
    name: str
    file: str
    domains: tuple[str, ...]
    upstream: str | None  # resolved upstream id of the organisation's choice
    enforce: bool
    pool: str | None
    members: dict[str, Member]
    limits: RateConf
    dkim_selectors: tuple[str, ...] = ()  # configured ones; () = the upstream's usual ones
    webhooks: dict[str, WebhookConf] = field(default_factory=dict)
    dsn: OrgDsnConf = field(default_factory=OrgDsnConf)
    dsn_upstream: str | None = None  # resolved upstream id of dsn.upstream
    suppression: SuppressionConf = field(default_factory=SuppressionConf)
    # Failover (relay/policy/failover.py): resolved upstream ids, in order; () = off.
    failover: tuple[str, ...] = ()
    failover_after: float = 600.0
    failover_deferrals: int | None = None
    region: str | None = None
    failover_outside_region: bool = False
    failover_from_own_servers: bool = False


def resolve_workers(value: int | str) -> int:
    """The `workers` setting as a number ("auto": one per CPU this process may use)."""
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))  # the CPUs we may run on (cgroups)
        except (AttributeError, OSError):  # not Linux
            return max(1, os.cpu_count() or 1)
    return int(value)


@dataclass(frozen=True)
class Config:
    file: str
    base_dir: Path
    relay: RelayConf
    sources: dict[str, EgressSource]
    pools: dict[str, EgressPool]
    upstreams: dict[str, Upstream]
    default_upstream: str
    orgs: dict[str, Org]
    domain_index: dict[str, str]  # sender domain -> org id
    account_index: dict[str, str]  # account address (lower-case) -> org id
    warnings: list[str] = field(
        default_factory=list
    )  # file:line: problems that do not stop serving
    # upstream id -> reference its username was resolved from; shown instead of the value
    username_refs: dict[str, str] = field(default_factory=dict)
    dsn_upstream: str = ""  # resolved: dsn.upstream, else default_upstream

    @property
    def hostname(self) -> str:
        return self.relay.hostname

    @property
    def workers(self) -> int:
        return resolve_workers(self.relay.workers)

    @property
    def spool_path(self) -> Path:
        p = Path(self.relay.spool.path)
        return p if p.is_absolute() else Path(os.path.normpath(self.base_dir / p))

    def org_of_domain(self, domain: str) -> str | None:
        """The organisation owning `domain` or its nearest parent domain."""
        labels = domain.lower().rstrip(".").split(".")
        # Every suffix, the whole domain included: an organisation may own a one-label
        # domain ("corp") too; a claim on a parent covers its subdomains.
        for i in range(len(labels)):
            org = self.domain_index.get(".".join(labels[i:]))
            if org:
                return org
        return None
