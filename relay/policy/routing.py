"""Routing: which upstream carries a message and from which egress pool.

Order (docs/architecture.md): the organisation's choice if it enforces it → the account's personal
choice → the organisation's default → the global default. The egress pool is the
organisation's pool when it sets one (customers allowlist the organisation's IPs), else the
upstream's. Total: any attribution yields a Route (config validation guarantees the ids).
"""

from __future__ import annotations

from collections.abc import Container
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


def route(
    config: Config, attribution: Attribution, verified: Container[str] | None = None
) -> Route:
    """`verified`: the ids of `verify: true` upstreams that have been verified (the relay's
    durable state, relay/spool/verification.py); None counts none as verified. An unverified
    one carries no mail: its `previous` upstream does, else the next rule's."""
    org = config.orgs.get(attribution.org)
    upstream_id = config.default_upstream
    rule = "global default upstream"
    candidates: list[tuple[str, str]] = []
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
        if rule != "global default upstream":
            candidates.append((upstream_id, rule))
            if (member is not None and member.upstream and org.upstream
                    and upstream_id == member.upstream and not org.enforce):
                candidates.append((org.upstream, f"default upstream of organisation {org.id}"))
    candidates.append((config.default_upstream, "global default upstream"))
    upstream_id, rule = _first_verified(config, candidates, verified or ())
    upstream = config.upstreams[upstream_id]
    pool_name = org.pool if org is not None and org.pool else upstream.pool
    return Route(attribution, upstream, config.pools[pool_name], rule)


def _first_verified(
    config: Config, candidates: list[tuple[str, str]], verified: Container[str]
) -> tuple[str, str]:
    """The first candidate that may carry mail, following `previous` from an unverified one."""
    waiting: list[str] = []
    for upstream_id, rule in candidates:
        seen: set[str] = set()
        uid: str | None = upstream_id
        while uid is not None and uid not in seen:
            seen.add(uid)
            up = config.upstreams.get(uid)
            if up is None:
                break
            if not up.verify or uid in verified:
                if waiting:
                    rule = f"{rule}; {', '.join(waiting)} not verified yet" + (
                        f" (its previous upstream {uid} carries the mail meanwhile)"
                        if uid != upstream_id else " (its mail goes here meanwhile)"
                    )
                return uid, rule
            waiting.append(uid)
            uid = up.previous
    # Only reached when the default itself waits for verification: the configuration
    # refuses that (relay.config.build), so this is a safe last resort.
    return candidates[-1]
