"""`relay route`: explain, for a sender, every decision the policy makes (pure formatting)."""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from relay.config.model import Config
from relay.policy import applicable_limits, attribute, route
from relay.policy.failover import chain


def explain(
    config: Config,
    sender: str,
    *,
    org: str | None,
    account: str | None,
    client: str,
    verified: Container[str] | None = None,
) -> dict[str, Any]:
    """`verified`: the verified `verify: true` upstreams (relay/spool/verification.py)."""
    att = attribute(config, sender, tag_org=org, tag_account=account)
    r = route(config, att, verified)
    up = r.upstream
    o = config.orgs.get(att.org)
    return {
        "sender": sender,
        "organisation": {
            "id": att.org,
            "name": o.name if o else att.org,
            "file": o.file if o else None,
        },
        "account": att.account,
        "attributed_by": att.rule,
        "upstream": {
            "id": up.id,
            "host": up.host,
            "port": up.port,
            "tls": up.tls.value,
            "username": config.username_refs.get(up.id, up.username),
            "password": up.password.source if up.password else None,
            "from_address": up.from_address,
            "verify_tls": up.verify_tls,
            "unavailable": up.unavailable,
            "auth": up.auth,
            "provider": up.provider,
            "oauth": up.oauth.describe() if up.oauth else None,
            "throttle": {
                k: getattr(up.throttle, k)
                for k in (
                    "max_connections",
                    "min_interval",
                    "max_messages_per_connection",
                    "hourly",
                    "daily",
                )
            }
            | (
                {"quotas": [f"{n} per {sec}s" for n, sec in up.throttle.quotas]}
                if up.throttle.quotas
                else {}
            ),
        },
        "routed_by": r.rule,
        "egress_pool": {
            "name": r.pool.name,
            "sources": [{"address": s.address, "ehlo": s.ehlo} for s in r.pool.sources],
        },
        "limits": [
            {"scope": lim.scope, "key": lim.key, "limit": lim.describe()}
            for lim in applicable_limits(config, att, sender, client)
        ],
        "failover": None
        if o is None or not o.failover
        else {
            "after_seconds": o.failover_after,
            "after_deferrals": o.failover_deferrals,
            "region": o.region,
            "chain": [
                {
                    "upstream": step.upstream,
                    "region": config.upstreams[step.upstream].region,
                    "allowed": step.allowed,
                    "note": step.note,
                }
                for step in chain(config, o, up)
            ],
        },
    }


def as_text(d: dict[str, Any]) -> str:
    up = d["upstream"]
    lines = [
        f"sender:        {d['sender'] or '<>'}",
        f"organisation:  {d['organisation']['id']} ({d['organisation']['name']})",
        f"account:       {d['account']}",
        f"attributed by: {d['attributed_by']}",
        f"upstream:      {up['id']}  {up['host']}:{up['port']} tls={up['tls']}"
        + (f" user={up['username']}" if up["username"] else "")
        + (f" password={up['password']}" if up["password"] else "")
        + (f" from={up['from_address']}" if up["from_address"] else ""),
        f"routed by:     {d['routed_by']}",
        f"egress pool:   {d['egress_pool']['name']}  "
        + ", ".join(f"{s['address']} ({s['ehlo']})" for s in d["egress_pool"]["sources"]),
    ]
    t = {k: v for k, v in up["throttle"].items() if v}
    if t:
        lines.append("throttle:      " + ", ".join(f"{k}={v}" for k, v in t.items()))
    if up.get("oauth"):
        lines.append(f"oauth:         {up['oauth']}")
    if up["unavailable"]:
        lines.append(f"WARNING:       upstream unavailable: {up['unavailable']}")
    for lim in d["limits"]:
        lines.append(f"limit:         {lim['scope']} {lim['key']}: {lim['limit']}")
    lines.extend(_failover_text(d.get("failover"), up["id"]))
    return "\n".join(lines)


def _failover_text(f: dict[str, Any] | None, primary: str) -> list[str]:
    if f is None:
        return ["failover:      off (the organisation lists no failover upstreams)"]
    when = f"{primary} unusable for {f['after_seconds']:g} s"
    if f["after_deferrals"]:
        when += f" or a message deferred {f['after_deferrals']} times"
    out = [f"failover:      when {when}"
           + (f"; bound to region {f['region']}" if f["region"] else "")]
    for step in f["chain"]:
        region = step["region"] or "unknown"
        if step["allowed"]:
            out.append(f"failover:      {step['upstream']} (region {region})")
        else:
            out.append(f"failover:      {step['upstream']} (region {region}) not used: "
                       f"{step['note']}")
    if not any(step["allowed"] for step in f["chain"]):
        out.append(f"failover:      none allowed: mail waits for {primary}")
    return out
