"""`relay queue shape`: the queue's age distribution by upstream or organisation, in the
spirit of Postfix's qshape (buckets that double: 0-5m, 5-10m, 10-20m, … 640-1280m, older).

The spool counts (Spool.age_shape); this module names the buckets, adds the totals, merges the
shapes of several workers and renders the table an operator reads."""

from __future__ import annotations

import time
from typing import Any

from relay.spool import Spool

# Upper edges in minutes, as qshape prints them.
EDGES_MINUTES = (5, 10, 20, 40, 80, 160, 320, 640, 1280)
LABELS = [f"{m}m" for m in EDGES_MINUTES] + [f"{EDGES_MINUTES[-1]}m+"]
BY = ("upstream", "org")


async def queue_shape(spool: Spool, by: str, now: float | None = None) -> dict[str, Any]:
    """{"by", "buckets": labels, "total": [counts], "groups": {name: [counts]}}."""
    groups = await spool.age_shape(
        by=by, edges=[m * 60.0 for m in EDGES_MINUTES], now=time.time() if now is None else now
    )
    return _with_total(by, groups)


def _with_total(by: str, groups: dict[str, list[int]]) -> dict[str, Any]:
    total = [sum(col) for col in zip(*groups.values(), strict=True)] if groups else [0] * len(LABELS)
    return {"by": by, "buckets": list(LABELS), "total": total, "groups": groups}


def merge_shapes(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One shape from several workers' (same `by`): counts added per group and bucket."""
    by = parts[0]["by"] if parts else "upstream"
    groups: dict[str, list[int]] = {}
    for part in parts:
        for name, counts in part["groups"].items():
            into = groups.setdefault(name, [0] * len(counts))
            for i, n in enumerate(counts):
                into[i] += int(n)
    return _with_total(by, groups)


def render(shape: dict[str, Any]) -> str:
    """The qshape-style table: one line per group, the busiest first, after the total."""
    labels = ["T", *shape["buckets"]]
    names = sorted(shape["groups"], key=lambda g: (-sum(shape["groups"][g]), g))
    width = max([len("TOTAL"), *(len(n or "unrouted") for n in names)]) + 2
    col = max(6, *(len(x) + 1 for x in labels))
    lines = [f"{'by ' + shape['by']:<{width}}" + "".join(f"{x:>{col}}" for x in labels)]
    for name, counts in [("TOTAL", shape["total"]), *((n, shape["groups"][n]) for n in names)]:
        cells = [sum(counts), *counts]
        lines.append(f"{name or 'unrouted':<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    return "\n".join(lines)
