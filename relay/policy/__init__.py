"""Policy: pure decisions over a loaded Config (owner, upstream, egress pool, limits)."""

from relay.policy.attribution import Attribution, attribute
from relay.policy.limits import AppliedLimit, applicable_limits
from relay.policy.routing import Route, route

__all__ = ["AppliedLimit", "Attribution", "Route", "applicable_limits", "attribute", "route"]
