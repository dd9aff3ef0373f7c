"""The running relay's state at a glance, as one JSON document (`GET /status.json`): health,
the queue by upstream and organisation, its age distribution, each upstream's state and
limits, the last hour's activity and the latest deferrals and bounces, the published egress
addresses. The status page (statuspage.py) and `relay top` both draw from it; with workers,
the supervisor merges the workers' documents (`merge_status`)."""

from __future__ import annotations

import time
from typing import Any, Protocol

from relay.config.model import Config
from relay.events import MailLog, Metrics
from relay.limits import limits_dir
from relay.limits.usage import current_use
from relay.ops.queueops import QueueOps
from relay.ops.shape import merge_shapes, queue_shape
from relay.policy.egress import as_dict
from relay.scheduler import Scheduler
from relay.spool import Spool


class StatusSource(Protocol):
    """What the status reads of a running relay (relay.runtime.node.Relay)."""

    config: Config
    scheduler: Scheduler
    spool: Spool
    metrics: Metrics
    events: MailLog
    ready: bool
    reload_errors: list[str]


def _throttle(up: Any) -> dict[str, Any]:
    t = up.throttle
    out: dict[str, Any] = {}
    if t.max_connections:
        out["max_connections"] = t.max_connections
    if t.min_interval:
        out["min_interval"] = t.min_interval
    if t.hourly:
        out["hourly"] = t.hourly
    if t.daily:
        out["daily"] = t.daily
    if t.quotas:
        out["quotas"] = [f"{n} per {int(w)}s" for n, w in t.quotas]
    return out


async def limit_use(config: Config, up: Any) -> list[str]:
    """The upstream's limits as used now, e.g. ["hourly 7/10", "connections 2/5"]; shared by
    the workers (spool/limits/limits.db) or the nodes (Redis), so one worker's view is all."""
    t = up.throttle
    if not (t.max_connections or t.hourly or t.daily or t.quotas):
        return []
    use = await current_use(config.relay.limits, [], up, limits_dir(config))
    if "note" in use:
        return [use["note"]]
    u = use["upstream"]
    out = [f"{q['limit']}: {q['used']} used" for q in u.get("quotas", [])]
    if "connections" in u:
        out.append(f"connections {u['connections']['used']}/{u['connections']['limit']}")
    return out


def upstream_states(config: Config, scheduler: Scheduler, now: float) -> list[dict[str, Any]]:
    """Each configured upstream: where it goes, its limits, and whether mail flows to it."""
    out = []
    used = {config.default_upstream}
    for org in config.orgs.values():
        used.add(org.upstream or "")
        used.update(m.upstream or "" for m in org.members.values())
    for uid, up in sorted(config.upstreams.items()):
        uq = scheduler.queues.get(uid)
        paused = uq.paused_until - now if uq is not None and uq.paused_until > now else 0.0
        held = scheduler.health.get(uid)  # paused for a person (relay/scheduler/health.py)
        if up.unavailable:
            state, reason = "unavailable", up.unavailable
        elif held is not None:
            state, reason = "paused", f"{held.pause.kind}: {held.pause.reason} — {held.pause.next_step}"
        elif paused > 0:
            state, reason = "paused", (
                uq.why.reason if uq is not None and uq.why is not None
                else f"slowed down or not answering: paused {paused:.0f}s more")
        else:
            state, reason = "active", None
        out.append({
            "id": uid,
            "host": up.host,
            "port": up.port,
            "tls": up.tls.value,
            "pool": up.pool,
            "state": state,
            "reason": reason,
            "routed_to": uid in used,  # by the policy (a preset nothing routes to is not)
            "paused_for": round(paused, 1),
            "in_flight": uq.active if uq is not None else 0,
            "ready": uq.size if uq is not None else 0,
            "limits": _throttle(up),
        })
    return out


async def node_status(node: StatusSource, *, worker: int | None = None) -> dict[str, Any]:
    now = time.time()
    summary = await node.spool.summary()
    for group in ("by_upstream", "by_org"):
        for g in summary[group].values():
            t = g.get("oldest_received_at")
            g["oldest_age"] = None if t is None else round(max(0.0, now - t), 1)
    t = summary.get("oldest_received_at")
    summary["oldest_age"] = None if t is None else round(max(0.0, now - t), 1)
    degraded = node.metrics.registry.get_sample_value("relay_limits_backend_degraded")
    return {
        "generated_at": round(now, 3),
        "hostname": node.config.hostname,
        "workers": [worker] if worker is not None else [],
        "health": {
            "ready": node.ready,
            "limits_backend_degraded": bool(degraded),
            "reload_errors": list(node.reload_errors),
        },
        "queue": summary,
        # why the queued messages wait, grouped by reason and upstream (relay/scheduler/why.py)
        "waiting": QueueOps(node.scheduler, node.spool).waiting(
            summary.get("messages", 0), summary.get("held", 0), now),
        "shape": await queue_shape(node.spool, "upstream", now),
        "upstreams": [
            {**u, "use": await limit_use(node.config, node.config.upstreams[u["id"]])}
            for u in upstream_states(node.config, node.scheduler, now)
        ],
        "activity": node.events.activity.snapshot(),
        "egress": as_dict(node.config),
    }


def merge_status(parts: list[dict[str, Any]], *, workers: int, down: list[int]) -> dict[str, Any]:
    """One document from the workers' (same configuration): counts added, states combined
    (an upstream paused in any worker is shown paused), ages the oldest, failures interleaved."""
    if not parts:
        return {"health": {"ready": False, "workers": workers, "workers_up": 0,
                           "unavailable_workers": down}}
    first = parts[0]
    out: dict[str, Any] = {k: first[k] for k in ("hostname", "egress")}
    out["generated_at"] = max(p["generated_at"] for p in parts)
    out["health"] = {
        "ready": all(p["health"]["ready"] for p in parts) and not down,
        "limits_backend_degraded": any(p["health"]["limits_backend_degraded"] for p in parts),
        "reload_errors": first["health"]["reload_errors"],
        "workers": workers,
        "workers_up": len(parts),
        "unavailable_workers": down,
    }
    out["queue"] = _merge_queue([p["queue"] for p in parts])
    out["waiting"] = _merge_waiting([p.get("waiting", []) for p in parts])
    out["shape"] = merge_shapes([p["shape"] for p in parts])
    out["upstreams"] = _merge_upstreams([p["upstreams"] for p in parts])
    out["activity"] = _merge_activity([p["activity"] for p in parts])
    return out


def _merge_waiting(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Groups of the same reason kind and upstream added up (the first worker's words)."""
    merged: dict[tuple[str, str | None], dict[str, Any]] = {}
    for part in parts:
        for w in part:
            k = (w["kind"], w.get("upstream"))
            if k in merged:
                merged[k]["messages"] += w["messages"]
            else:
                merged[k] = dict(w)
    return sorted(merged.values(), key=lambda w: (-w["messages"], w["kind"]))


def _oldest(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _merge_queue(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: sum(p.get(k, 0) for p in parts) for k in ("messages", "recipients_pending", "held")
    }
    out["oldest_age"] = _oldest([p.get("oldest_age") for p in parts])
    for group in ("by_upstream", "by_org"):
        merged: dict[str, dict[str, Any]] = {}
        for p in parts:
            for name, g in p.get(group, {}).items():
                m = merged.setdefault(name, {"messages": 0, "recipients_pending": 0, "held": 0,
                                             "oldest_age": None})
                for k in ("messages", "recipients_pending", "held"):
                    m[k] += g.get(k, 0)
                m["oldest_age"] = _oldest([m["oldest_age"], g.get("oldest_age")])
        out[group] = merged
    return out


_STATE_RANK = {"active": 0, "paused": 1, "unavailable": 2}


def _merge_upstreams(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for u in part:
            m = merged.get(u["id"])
            if m is None:
                merged[u["id"]] = dict(u)
                continue
            m["in_flight"] += u["in_flight"]
            m["ready"] += u["ready"]
            if _STATE_RANK.get(u["state"], 0) > _STATE_RANK.get(m["state"], 0):
                m["state"], m["reason"] = u["state"], u["reason"]
            m["paused_for"] = max(m["paused_for"], u["paused_for"])
    return [merged[k] for k in sorted(merged)]


def _merge_activity(parts: list[dict[str, Any]]) -> dict[str, Any]:
    minutes = max((p["minutes"] for p in parts), key=lambda m: m[-1])
    per: dict[str, list[int]] = {}
    for p in parts:
        offset = {m: i for i, m in enumerate(p["minutes"])}
        for name, counts in p["per_minute"].items():
            into = per.setdefault(name, [0] * len(minutes))
            for i, m in enumerate(minutes):
                j = offset.get(m)
                if j is not None:
                    into[i] += counts[j]
    totals: dict[str, int] = {}
    for p in parts:
        for k, v in p["totals"].items():
            totals[k] = totals.get(k, 0) + v
    recent = sorted((r for p in parts for r in p["recent"]), key=lambda r: -r["ts"])
    return {"minutes": minutes, "per_minute": per, "totals": totals, "recent": recent[:50]}
