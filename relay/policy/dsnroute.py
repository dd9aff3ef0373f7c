"""Where a DSN goes: an upstream that can carry mail to the *sender*, never by default the
customer server that refused the original (it usually accepts only its own sender address).

Order: the organisation's `dsn.upstream` → relay.yaml's `dsn.upstream` → `default_upstream`.
An organisation with `dsn.enabled: false` gets none (it takes webhooks instead). The egress
pool is the DSN upstream's own (an organisation's pool is for its own servers).
"""

from __future__ import annotations

from relay.config.model import Config
from relay.core.model import EgressPool, Upstream


def dsn_upstream_id(config: Config, org: str) -> str | None:
    """The upstream id for this organisation's DSNs, or None when it turned DSNs off."""
    o = config.orgs.get(org)
    if o is not None:
        if not o.dsn.enabled:
            return None
        if o.dsn_upstream:
            return o.dsn_upstream
    return config.dsn_upstream or config.default_upstream


def dsn_route(config: Config, org: str) -> tuple[Upstream, EgressPool]:
    """The upstream and pool a queued DSN goes through (DSNs already queued still go even
    if the organisation has since turned them off)."""
    o = config.orgs.get(org)
    uid = (o.dsn_upstream if o is not None and o.dsn_upstream else None) or (
        config.dsn_upstream or config.default_upstream)
    upstream = config.upstreams[uid]
    return upstream, config.pools[upstream.pool]
