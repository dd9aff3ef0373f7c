"""The admin API's endpoints for what the platform is told (docs/openapi.yaml): the event
log (`/events`), each webhook endpoint's outbox (`/events/outbox`) and replay
(`/events/replay`), message traces (`/trace`) and the suppression list (`/suppression`).
The token check is the admin API's (relay/ops/admin.py)."""

from __future__ import annotations

import csv
import io
import json
import time
from typing import Any, Protocol

from aiohttp import web

from relay.config.model import Config
from relay.config.units import parse_duration
from relay.notify.suppression import Suppression, SuppressionList
from relay.notify.trace import trace
from relay.notify.webhook import WebhookSender
from relay.ops.http import error_response as _error
from relay.ops.http import json_response as _json
from relay.spool import Spool

MAX_EVENTS = 5000


class NotifyRelay(Protocol):
    config: Config
    spool: Spool
    webhooks: WebhookSender
    suppression: SuppressionList


def _float(q: Any, key: str) -> float | None:
    v = q.get(key)
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{key}: not a number"}),
                                 content_type="application/json") from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                 content_type="application/json")
    return body


class NotifyApi:
    def __init__(self, relay: NotifyRelay) -> None:
        self.relay = relay

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/events", self.events)
        r.add_get("/events/outbox", self.outbox)
        r.add_post("/events/replay", self.replay)
        r.add_get("/trace", self.trace)
        r.add_get("/suppression", self.suppression_list)
        r.add_post("/suppression", self.suppression_add)
        r.add_delete("/suppression/{org}/{recipient}", self.suppression_remove)

    async def events(self, request: web.Request) -> web.Response:
        q = request.query
        after = int(_float(q, "after") or 0)
        since = _float(q, "since")
        limit = max(1, min(int(_float(q, "limit") or 100), MAX_EVENTS))
        types = [t for t in q.get("type", "").split(",") if t] or None
        log = self.relay.spool.events
        if since is not None:
            after = max(after, await log.seq_at(since))
        found = await log.after(after, limit, types=types, org=q.get("org") or None)
        stream = self.relay.webhooks.stream
        out = []
        for e in found:
            d = json.loads(e.row.data)
            d["seq"], d["stream"] = e.seq, stream
            out.append(d)
        return _json({"count": len(out), "events": out,
                      "next_after": found[-1].seq if found else after, "stream": stream})

    async def outbox(self, request: web.Request) -> web.Response:
        last, kept, oldest = await self.relay.spool.events.stats()
        return _json({"endpoints": await self.relay.webhooks.status(),
                      "log": {"stream": self.relay.webhooks.stream, "last_seq": last,
                              "events": kept, "oldest_ts": oldest}})

    async def replay(self, request: web.Request) -> web.Response:
        body = await _body(request)
        endpoint = body.get("endpoint")
        since, event_id = body.get("since"), body.get("event_id")
        if (since is None) == (event_id is None):
            return _error(400, "give since (unix time, or an age such as 2h) or event_id")
        if endpoint is not None and endpoint not in self.relay.webhooks.states:
            return _error(404, f"no webhook endpoint '{endpoint}'")
        if isinstance(since, str):
            try:
                since = time.time() - parse_duration(since)
            except ValueError as exc:
                return _error(400, f"since: {exc}")
        if since is not None and not isinstance(since, int | float):
            return _error(400, "since: a unix time or an age such as 2h")
        result = await self.relay.webhooks.replay(
            endpoint, since=float(since) if since is not None else None,
            event_id=str(event_id) if event_id is not None else None)
        return _json(result, 200 if result["found"] else 404)

    async def trace(self, request: web.Request) -> web.Response:
        query = request.query.get("q", "").strip()
        if not query:
            return _error(400, "give q: a queue id, a Message-ID or a recipient address")
        w = self.relay.webhooks
        result = await trace(self.relay.spool, query, endpoints=list(w.states.values()),
                             stream=w.stream)
        return _json(result, 200 if result["messages"] else 404)

    # -- suppression --------------------------------------------------------------------
    async def suppression_list(self, request: web.Request) -> web.Response:
        org = request.query.get("org") or None
        entries = self.relay.suppression.entries(org)
        if request.query.get("format") == "csv":
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["org", "recipient", "class", "reason", "created_at", "expires_at",
                        "source"])
            for s in entries:
                w.writerow([s.org, s.recipient, s.klass, s.reason, s.created_at,
                            s.expires_at or "", s.source])
            return web.Response(text=buf.getvalue(), content_type="text/csv")
        return _json({"count": len(entries), "entries": [s.as_dict() for s in entries]})

    async def suppression_add(self, request: web.Request) -> web.Response:
        body = await _body(request)
        org, rcpt = body.get("org"), body.get("recipient")
        if not isinstance(org, str) or (org not in self.relay.config.orgs and org != (
                self.relay.config.relay.attribution.default_org)):
            return _error(400, "org: the id of a configured organisation")
        if not isinstance(rcpt, str) or "@" not in rcpt or any(c in rcpt for c in " \r\n<>"):
            return _error(400, "recipient: an email address")
        duration = body.get("duration")
        try:
            seconds = parse_duration(duration) if duration not in (None, "") else None
        except ValueError as exc:
            return _error(400, f"duration: {exc}")
        now = time.time()
        reason = str(body.get("reason") or "added by the relay administrator")
        entry = Suppression(org, rcpt.lower(), reason, "manual", now,
                            now + seconds if seconds else None, "operator")
        await self.relay.suppression.add(entry)
        shown = self.relay.suppression.lookup(org, rcpt)
        return _json((shown or entry).as_dict(), 201)

    async def suppression_remove(self, request: web.Request) -> web.Response:
        org, rcpt = request.match_info["org"], request.match_info["recipient"]
        if await self.relay.suppression.remove(org, rcpt):
            return _json({"org": org, "recipient": rcpt.lower(), "removed": True})
        return _error(404, f"{rcpt} is not suppressed for organisation {org}")
