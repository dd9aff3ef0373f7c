"""Current use of the limits that apply to a route, for `relay route` (read-only).

With the Redis backend every node's counters are in Redis, so any process can read them.
With the memory backend the upstream's quotas, pause and connections are in this machine's
`spool/limits/limits.db` (read here read-only); intake windows live inside each running
worker, which the CLI cannot see: the answer says so instead of printing zeros that look
true.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from limits.aio.strategies import FixedWindowRateLimiter

from relay.config.schema import LimitsConf
from relay.core.model import Upstream
from relay.limits.failover import BACKEND_ERRORS
from relay.limits.gate import quota_windows
from relay.limits.intake import intake_windows
from relay.limits.machine import DB_NAME, SqliteStorage
from relay.limits.redis_store import RedisStore
from relay.policy import AppliedLimit

MEMORY_NOTE = (
    "limits backend is memory: current use lives inside the running relay and is not"
    " visible to this command (see its relay_limit_hits metric)"
)


INTAKE_NOTE = (
    "intake limits are counted inside each running worker and are not visible to this"
    " command (see its relay_limit_hits metric)"
)


async def current_use(
    conf: LimitsConf,
    limits: list[AppliedLimit],
    upstream: Upstream,
    directory: Path | None = None,
) -> dict[str, Any]:
    """`directory`: where the memory backend keeps this machine's limits."""
    if conf.backend != "redis" or not conf.redis_url:
        if directory is not None and (directory / DB_NAME).exists():
            return await machine_use(directory, upstream)
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


async def machine_use(directory: Path, upstream: Upstream) -> dict[str, Any]:
    """The memory backend's upstream counters, read-only from `limits.db`."""
    db = sqlite3.connect(f"file:{directory / DB_NAME}?mode=ro", uri=True, timeout=5.0)
    try:
        fixed = FixedWindowRateLimiter(SqliteStorage(db))
        quotas = []
        for w in quota_windows(upstream):
            stats = await fixed.get_window_stats(w.item, *w.ident)
            quotas.append({"limit": w.describe(), "used": w.amount - stats.remaining})
        row = db.execute("SELECT until FROM pauses WHERE key = ?", (upstream.id,)).fetchone()
        up: dict[str, Any] = {
            "quotas": quotas,
            "paused_for": round(max(0.0, float(row[0]) - time.time()), 1) if row else 0.0,
        }
        if upstream.throttle.max_connections:
            held = db.execute("SELECT COALESCE(SUM(held), 0) FROM slots WHERE key = ?",
                              (upstream.id,)).fetchone()[0]
            up["connections"] = {"limit": upstream.throttle.max_connections, "used": int(held)}
        return {"backend": "memory", "intake": [], "intake_note": INTAKE_NOTE, "upstream": up}
    except sqlite3.Error as exc:
        return {"backend": "memory", "note": f"cannot read {directory / DB_NAME}: {exc}"}
    finally:
        db.close()


def as_text(use: dict[str, Any]) -> list[str]:
    if "note" in use:
        return [f"current use:   {use['note']}"]
    lines = [f"current use:   {u['limit']}: {u['used']} used" for u in use["intake"]]
    if "intake_note" in use:
        lines.append(f"current use:   {use['intake_note']}")
    up = use["upstream"]
    for q in up["quotas"]:
        lines.append(f"current use:   upstream quota {q['limit']}: {q['used']} used")
    if "connections" in up:
        c = up["connections"]
        lines.append(f"current use:   upstream connections: {c['used']} of {c['limit']}")
    if up["paused_for"]:
        lines.append(f"current use:   upstream paused for {up['paused_for']} s (slow-down)")
    return lines
