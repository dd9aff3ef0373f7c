"""Current use of the limits that apply to a route, for `relay route` (read-only).

With the Redis backend every node's counters are in Redis, so any process can read them.
With the memory backend they live inside the running relay, which the CLI cannot see; the
answer says so instead of printing zeros that look true.
"""

from __future__ import annotations

from typing import Any

from relay.config.schema import LimitsConf
from relay.core.model import Upstream
from relay.limits.failover import BACKEND_ERRORS
from relay.limits.gate import quota_windows
from relay.limits.intake import intake_windows
from relay.limits.redis_store import RedisStore
from relay.policy import AppliedLimit

MEMORY_NOTE = (
    "limits backend is memory: current use lives inside the running relay and is not"
    " visible to this command (see its relay_limit_hits metric)"
)


async def current_use(
    conf: LimitsConf, limits: list[AppliedLimit], upstream: Upstream
) -> dict[str, Any]:
    if conf.backend != "redis" or not conf.redis_url:
        return {"backend": conf.backend, "note": MEMORY_NOTE}
    store = RedisStore(conf.redis_url, node_id="relay-route", timeout=conf.redis_timeout)
    try:
        intake = [
            {"limit": f"{w.label}: {w.describe()}", "used": await store.used(w, fixed=False)}
            for w in intake_windows(limits)
        ]
        up: dict[str, Any] = {
            "quotas": [
                {"limit": w.describe(), "used": await store.used(w, fixed=True)}
                for w in quota_windows(upstream)
            ],
            "paused_for": round(await store.paused(upstream.id), 1),
        }
        if upstream.throttle.max_connections:
            up["connections"] = {
                "limit": upstream.throttle.max_connections,
                "used": await store.leases(upstream.id),
            }
        return {"backend": "redis", "intake": intake, "upstream": up}
    except BACKEND_ERRORS as exc:
        return {"backend": "redis", "note": f"Redis unreachable ({type(exc).__name__}: {exc})"}
    finally:
        await store.close()


def as_text(use: dict[str, Any]) -> list[str]:
    if "note" in use:
        return [f"current use:   {use['note']}"]
    lines = [f"current use:   {u['limit']}: {u['used']} used" for u in use["intake"]]
    up = use["upstream"]
    for q in up["quotas"]:
        lines.append(f"current use:   upstream quota {q['limit']}: {q['used']} used")
    if "connections" in up:
        c = up["connections"]
        lines.append(f"current use:   upstream connections: {c['used']} of {c['limit']}")
    if up["paused_for"]:
        lines.append(f"current use:   upstream paused for {up['paused_for']} s (slow-down)")
    return lines
