"""The supervisor's view of events, outboxes, traces and suppression (`workers: N`): each
worker keeps its own shard's events and webhook outboxes, so views are merged here; the
suppression list is one per node (shared by the workers), so any worker answers for it."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web


class Answer(Protocol):
    """relay.runtime.fanout.Answer: one worker's reply."""

    status: int
    body: bytes
    content_type: str

    def json(self) -> Any: ...


All = Callable[[web.Request, bytes], Awaitable[tuple[list[Any], list[int]]]]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n",
                        content_type="application/json")


def _reply(a: Answer) -> web.Response:
    return web.Response(status=a.status, body=a.body, content_type=a.content_type or None)


def _down(down: list[int]) -> web.Response:
    return _json({"error": f"worker(s) {', '.join(map(str, down))} not answering;"
                  " try again shortly"}, 503)


def merge_outboxes(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One line per endpoint over every shard: depths and drops add up, the oldest event
    is the oldest of all, the last error the most recent."""
    by_name: dict[str, dict[str, Any]] = {}
    logs = []
    for p in parts:
        logs.append(p.get("log"))
        for ep in p.get("endpoints", []):
            into = by_name.get(ep["endpoint"])
            if into is None:
                into = by_name[ep["endpoint"]] = dict(ep, shards=[])
                into["depth"] = into["dropped"] = into["failures"] = 0
                into["oldest_ts"] = into["oldest_age"] = into["last_error"] = None
                into["last_error_at"] = into["last_success_at"] = None
                into.pop("acked_seq", None)
                into.pop("stream", None)
            into["shards"].append({"stream": ep.get("stream"), "acked_seq": ep.get("acked_seq"),
                                   "depth": ep.get("depth")})
            into["depth"] += ep.get("depth") or 0
            into["dropped"] += ep.get("dropped") or 0
            into["failures"] = max(into["failures"], ep.get("failures") or 0)
            for key, pick in (("oldest_ts", min), ("oldest_age", max),
                              ("last_success_at", max)):
                vals = [v for v in (into[key], ep.get(key)) if v is not None]
                into[key] = pick(vals) if vals else None
            if ep.get("last_error_at") and (into["last_error_at"] or 0) < ep["last_error_at"]:
                into["last_error_at"], into["last_error"] = ep["last_error_at"], ep["last_error"]
    return {"endpoints": list(by_name.values()), "logs": logs}


def add_notify_routes(r: web.UrlDispatcher, ask_all: All, first: Handler) -> None:
    """`ask_all`: every worker's answer (Fanout.all); `first`: the first worker that answers."""

    async def views(request: web.Request) -> tuple[list[Answer], list[int], web.Response | None]:
        answers, down = await ask_all(request, await request.read())
        bad = next((a for a in answers if a.status not in (200, 404)), None)
        return answers, down, _reply(bad) if bad is not None else None

    async def events(request: web.Request) -> web.Response:
        answers, down, bad = await views(request)
        if bad is not None:
            return bad
        found = [e for a in answers for e in a.json().get("events", [])]
        found.sort(key=lambda e: (e.get("ts") or 0, e.get("stream") or "", e.get("seq") or 0))
        try:
            limit = int(request.query.get("limit", 100))
        except ValueError:
            limit = 100
        found = found[: max(1, limit)]
        return _json({"count": len(found), "events": found, "unavailable_workers": down})

    async def outbox(request: web.Request) -> web.Response:
        answers, down, bad = await views(request)
        if bad is not None:
            return bad
        out = merge_outboxes([a.json() for a in answers])
        out["unavailable_workers"] = down
        return _json(out)

    async def replay(request: web.Request) -> web.Response:
        answers, down, bad = await views(request)
        if bad is not None:
            return bad
        if down:
            return _down(down)
        results = [a.json() for a in answers]
        found = any(x.get("found") for x in results)
        return _json({"found": found, "shards": results}, 200 if found else 404)

    async def trace(request: web.Request) -> web.Response:
        answers, down, bad = await views(request)
        if bad is not None:
            return bad
        messages = [m for a in answers if a.status == 200 for m in a.json().get("messages", [])]
        messages.sort(key=lambda m: m["events"][0].get("ts") or 0 if m.get("events") else 0)
        body = {"query": request.query.get("q", ""), "messages": messages,
                "unavailable_workers": down}
        return _json(body, 200 if messages else 404)

    r.add_get("/events", events)
    r.add_get("/events/outbox", outbox)
    r.add_post("/events/replay", replay)
    r.add_get("/trace", trace)
    r.add_get("/suppression", first)
    r.add_post("/suppression", first)
    r.add_delete("/suppression/{org}/{recipient}", first)
