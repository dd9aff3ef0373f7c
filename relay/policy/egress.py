"""The published egress list: what customers allowlist, as text, JSON or SPF mechanisms."""

from __future__ import annotations

import json

from relay.config.model import Config
from relay.core.model import EgressSource


def sources_in(config: Config, pool: str | None = None) -> list[EgressSource]:
    """Every source (of one pool, or of all pools), each once, in configuration order."""
    pools = [config.pools[pool]] if pool else list(config.pools.values())
    seen: dict[str, EgressSource] = {}
    for p in pools:
        for s in p.sources:
            seen.setdefault(s.address, s)
    return list(seen.values())


def as_dict(config: Config, pool: str | None = None) -> dict[str, object]:
    names = [pool] if pool else list(config.pools)
    return {
        "addresses": [s.address for s in sources_in(config, pool)],
        "pools": {
            n: [
                {"name": s.name, "address": s.address, "ehlo": s.ehlo}
                for s in config.pools[n].sources
            ]
            for n in names
        },
    }


def render(config: Config, pool: str | None, fmt: str) -> str:
    srcs = sources_in(config, pool)
    if fmt == "json":
        return json.dumps(as_dict(config, pool), indent=2)
    if fmt == "spf":
        return " ".join(("ip6:" if ":" in s.address else "ip4:") + s.address for s in srcs)
    pools_of = {s.address: [p.name for p in config.pools.values() if s in p.sources] for s in srcs}
    return "\n".join(f"{s.address}\t{s.ehlo}\t{','.join(pools_of[s.address])}" for s in srcs)
