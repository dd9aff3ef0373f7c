"""Routing: which upstream carries a message and from which egress pool.

Order (docs/architecture.md): the organisation's choice if it enforces it → the account's personal
choice → the organisation's default → the global default. The egress pool is the
organisation's pool when it sets one (customers allowlist the organisation's IPs), else the
upstream's. Total: any attribution yields a Route (config validation guarantees the ids).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.model import Config
from relay.core.model import EgressPool, Upstream
from relay.policy.attribution import Attribution


@dataclass(frozen=True, slots=True)
class Route:
    attribution: Attribution
    upstream: Upstream
    pool: EgressPool
    rule: str


def route(config: Config, attribution: Attribution) -> Route:
    org = config.orgs.get(attribution.org)
    upstream_id = config.default_upstream
    rule = "global default upstream"
    if org is not None:
        member = org.members.get(attribution.account)
        if org.enforce and org.upstream:
            upstream_id, rule = org.upstream, f"organisation {org.id} enforces its upstream"
            if member is not None and member.upstream and member.upstream != org.upstream:
                rule += f" (overrides {attribution.account}'s personal choice {member.upstream})"
        elif member is not None and member.upstream:
            upstream_id, rule = member.upstream, f"personal choice of account {attribution.account}"
        elif org.upstream:
            upstream_id, rule = org.upstream, f"default upstream of organisation {org.id}"
    upstream = config.upstreams[upstream_id]
    pool_name = org.pool if org is not None and org.pool else upstream.pool
    return Route(attribution, upstream, config.pools[pool_name], rule)
