"""Failover: an organisation's choice to send through the next upstream of its list when its
own has been unusable long enough, or a message has been deferred often enough. Pure: the
scheduler passes in since when each upstream has been unusable (relay/scheduler/health.py).

Off unless the organisation lists upstreams (`failover: [mailjet]`). Never away from the
organisation's own server (an upstream defined in its file) unless `failover_from_own_servers`;
never to an upstream outside the organisation's `region` (data processing agreements) unless
`failover_outside_region`. An upstream that is itself unusable, or unavailable as configured,
is skipped for the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from relay.config.model import Config, Org
from relay.core.model import Upstream
from relay.policy.routing import Route


@dataclass(frozen=True, slots=True)
class Unusable:
    since: float  # wall clock
    why: str  # "not answering", "slowed down: 421 ...", a refused credential's reply


@dataclass(frozen=True, slots=True)
class Step:
    """One upstream of an organisation's failover list, and whether its policy allows it."""

    upstream: str
    allowed: bool
    note: str


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def chain(config: Config, org: Org, primary: Upstream) -> list[Step]:
    """The organisation's failover list as seen from `primary` (for `relay route`, too)."""
    own = primary.id.startswith(org.id + "/")
    out = []
    for uid in org.failover:
        up = config.upstreams.get(uid)
        if up is None or uid == primary.id:
            continue
        region = up.region or "unknown"
        if own and not org.failover_from_own_servers:
            out.append(Step(uid, False, f"{primary.id} is the organisation's own server"
                            " (failover_from_own_servers: false)"))
        elif org.region and up.region != org.region and not org.failover_outside_region:
            out.append(Step(uid, False, f"region {region} is outside the organisation's region"
                            f" {org.region} (failover_outside_region: false)"))
        else:
            out.append(Step(uid, True, f"region {region}"))
    return out


def fail_over(
    config: Config,
    r: Route,
    *,
    unusable: Mapping[str, Unusable],
    deferrals: int,
    now: float,
) -> tuple[Route, str]:
    """The route to use now and, when it is a failover, why ("" when it is not)."""
    org = config.orgs.get(r.attribution.org)
    if org is None or not org.failover:
        return r, ""
    primary = unusable.get(r.upstream.id)
    if primary is not None and now - primary.since >= org.failover_after:
        why = f"{r.upstream.id} unusable for {_duration(now - primary.since)} ({primary.why})"
    elif org.failover_deferrals is not None and deferrals >= org.failover_deferrals:
        why = f"deferred {deferrals} times by {r.upstream.id}"
    else:
        return r, ""
    for step in chain(config, org, r.upstream):
        up = config.upstreams[step.upstream]
        bad = unusable.get(up.id)
        if not step.allowed or up.unavailable or (
            bad is not None and now - bad.since >= org.failover_after
        ):
            continue
        pool = config.pools[org.pool or up.pool]
        rule = f"failover to {up.id}: {why}"
        return Route(r.attribution, up, pool, rule), rule
    return r, ""
