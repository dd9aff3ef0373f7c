"""The admin API of a supervisor: one front for the private APIs of its workers.

With `workers: N` every worker serves the ordinary admin API (relay/ops/admin.py) on a private
Unix socket; the supervisor serves the configured address and answers each request by
asking the workers and merging what they say, so `relay queue`, `relay reload`, Prometheus
and the OpenAPI description see one relay, whatever N is:

- views add up: queue summary counts are summed (oldest is the minimum), listings merged
  by age and cut to the limit, metric samples with the same name and labels summed, plus
  `relay_workers` and `relay_workers_up`;
- a queue id lives in exactly one shard: per-message requests go to every worker and the
  one that knows the id answers (404 if none does); bulk actions are merged per id;
- reload is asked of every worker (each re-reads the same files; any refusal is reported);
  test-upstream and egress-ips go to the first worker that answers.

The token is checked by the workers (same configuration), so there is one place that
decides. A worker that does not answer (restarting) is named in views under
`unavailable_workers`; an action that might concern its shard answers 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from relay.ops.http import start_tcp_site
from relay.ops.shape import merge_shapes
from relay.ops.status import merge_status
from relay.ops.statuspage import login_page
from relay.ops.statuspage import render as render_status
from relay.runtime.fanout_notify import add_notify_routes

log = logging.getLogger("relay.admin")

CALL_TIMEOUT = 120.0  # bulk actions on a large queue take a while; probes up to a minute
_FORWARDED_HEADERS = ("Authorization", "Content-Type", "Accept", "Cookie")
# A worker's answer headers the supervisor passes back (the status page's login).
_RETURNED_HEADERS = ("Set-Cookie", "Location", "WWW-Authenticate")


@dataclass
class Answer:
    worker: int
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def _spool_full(answer: Answer) -> str | None:
    """A worker's /readyz reason for not being ready because its spool is full."""
    try:
        why = answer.json().get("spool_full")
    except (ValueError, AttributeError):
        return None
    return why if isinstance(why, str) else None


class WorkerDown(Exception):
    pass


class Fanout:
    """Forwarding to the workers' Unix sockets (one client session each)."""

    def __init__(self, sockets: list[str]) -> None:
        self.sockets = sockets
        self._sessions: list[aiohttp.ClientSession] = []

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT)
        self._sessions = [
            # A forwarding proxy: no cookies kept between callers, no redirects followed
            # (the browser follows them, as for any answer of the worker's).
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=p), timeout=timeout,
                                  cookie_jar=aiohttp.DummyCookieJar())
            for p in self.sockets
        ]

    async def close(self) -> None:
        for s in self._sessions:
            await s.close()

    async def call(
        self, worker: int, request: web.Request, body: bytes, path: str | None = None
    ) -> Answer:
        """`request` as it came, or (with `path`) a GET of another path with its headers."""
        headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
        url = f"http://worker{worker}{path or request.rel_url}"
        try:
            async with self._sessions[worker].request(
                "GET" if path else request.method, url, data=body or None, headers=headers,
                allow_redirects=False,
            ) as resp:
                data = await resp.read()
                kept = {h: resp.headers[h] for h in _RETURNED_HEADERS if h in resp.headers}
                return Answer(worker, resp.status, data, resp.content_type, kept)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise WorkerDown(f"worker {worker}: {type(exc).__name__}: {exc}") from None

    async def post_all(self, path: str, request: web.Request) -> None:
        """POST `path` to every worker (with the caller's credentials); best effort."""
        headers = {h: request.headers[h] for h in _FORWARDED_HEADERS if h in request.headers}
        for i, session in enumerate(self._sessions):
            try:
                async with session.post(f"http://worker{i}{path}", headers=headers) as resp:
                    await resp.read()
            except (aiohttp.ClientError, OSError, TimeoutError):
                log.warning("worker %d did not take %s", i, path)

    async def all(
        self, request: web.Request, body: bytes, path: str | None = None
    ) -> tuple[list[Answer], list[int]]:
        """Every worker's answer, and the workers that gave none."""
        results = await asyncio.gather(
            *(self.call(i, request, body, path) for i in range(len(self.sockets))),
            return_exceptions=True,
        )
        answers, down = [], []
        for i, r in enumerate(results):
            if isinstance(r, Answer):
                answers.append(r)
            else:
                down.append(i)
        return answers, down


def _reply(a: Answer) -> web.Response:
    return web.Response(status=a.status, body=a.body, content_type=a.content_type or None,
                        headers=a.headers or None)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, indent=1) + "\n", content_type="application/json"
    )


def _down(down: list[int]) -> web.Response:
    return _json(
        {"error": f"worker(s) {', '.join(map(str, down))} not answering; try again shortly"}, 503
    )


# -- merging ------------------------------------------------------------------------------


def _add_group(into: dict[str, Any], g: dict[str, Any]) -> None:
    for key in ("messages", "recipients_pending", "held"):
        into[key] = into.get(key, 0) + g.get(key, 0)
    for key, pick in (("oldest_received_at", min), ("oldest_age", max)):
        values = [v for v in (into.get(key), g.get(key)) if v is not None]
        into[key] = pick(values) if values else None


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"by_upstream": {}, "by_org": {}}
    for p in parts:
        _add_group(out, p)
        for group in ("by_upstream", "by_org"):
            for name, g in p.get(group, {}).items():
                _add_group(out[group].setdefault(name, {}), g)
    # an upstream paused in any worker is paused (each worker finds out for itself)
    out["paused_upstreams"] = {k: v for p in parts for k, v in p.get("paused_upstreams", {}).items()}
    for key in ("messages", "recipients_pending", "held", "oldest_received_at", "oldest_age"):
        out.setdefault(key, 0 if key in ("messages", "recipients_pending", "held") else None)
    out["waiting"] = merge_waiting([p.get("waiting", []) for p in parts])
    return out


def merge_waiting(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Why messages wait, from every worker: counts of one (reason, upstream) added; the
    sentence of the one whose wait ends last (a shared quota or pause reads the same)."""
    merged: dict[tuple[str, str | None], dict[str, Any]] = {}
    for part in parts:
        for g in part:
            k = (g["kind"], g.get("upstream"))
            m = merged.get(k)
            if m is None:
                merged[k] = dict(g)
                continue
            m["messages"] += g["messages"]
            earlier = g["kind"] == "retry"  # many deferred messages: the first one due
            later = (g.get("until") or 0) > (m.get("until") or 0)
            if g.get("until") and (later != earlier or not m.get("until")):
                m["reason"], m["until"] = g["reason"], g["until"]
    return [merged[k] for k in sorted(merged, key=lambda k: (k[0], k[1] or ""))]


# Gauges where the relay's value is the largest of its workers', not their sum.
MAX_FAMILIES = frozenset({
    "relay_queue_oldest_age_seconds",
    "relay_limits_backend_degraded",
    # every shard lives on the spool's one file system: the same figure from each worker
    "relay_spool_filesystem_avail_bytes",
    "relay_spool_filesystem_size_bytes",
    "relay_upstream_paused",  # paused in any worker: paused
    "relay_webhook_outbox_oldest_age_seconds",  # each worker's outbox: the oldest of them
})


def merge_metrics(texts: list[str]) -> str:
    """Prometheus text from each worker → one text: samples with the same name and labels
    summed (counters, histogram buckets and queue depths add up across shards), except the
    gauges in MAX_FAMILIES (the oldest message, a degraded backend), which take the maximum."""
    order: list[str] = []
    comments: dict[str, list[str]] = {}  # family -> its # HELP / # TYPE lines
    samples: dict[str, dict[str, float]] = {}  # family -> series -> value
    for text in texts:
        family = ""
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    if family not in comments:
                        comments[family] = []
                        order.append(family)
                        samples[family] = {}
                    if line not in comments[family]:
                        comments[family].append(line)
                continue
            series, _, value = line.rpartition(" ")
            if family not in samples:  # a sample without a family header
                comments[family] = []
                samples[family] = {}
                order.append(family)
            try:
                v = float(value)
            except ValueError:
                continue
            seen = samples[family].get(series)
            if seen is None:
                samples[family][series] = v
            else:
                samples[family][series] = max(seen, v) if family in MAX_FAMILIES else seen + v
    out: list[str] = []
    for family in order:
        out.extend(comments[family])
        for series, v in samples[family].items():
            out.append(f"{series} {_number(v)}")
    return "\n".join(out) + "\n"


def _number(v: float) -> str:
    return str(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


# -- the API ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FanoutApi:
    def __init__(self, fanout: Fanout, listeners: Callable[[], dict[str, int]],
                 on_reloaded: Callable[[], None]) -> None:
        self.fanout = fanout
        self.listeners = listeners  # name -> port, from the supervisor's sockets
        self.on_reloaded = on_reloaded  # the supervisor re-reads its own copy of the config

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/egress-ips", self.first)
        r.add_post("/test-upstream", self.test_upstream)
        r.add_get("/upstreams", self.upstreams)
        r.add_post("/upstreams/{name:.+}/verify", self.first)  # the state is one shared file
        r.add_post("/upstreams/{name:.+}/resume", self.resume)
        r.add_get("/queue", self.queue_summary)
        r.add_get("/queue/messages", self.queue_list)
        r.add_get("/queue/shape", self.queue_shape)
        r.add_post("/queue/actions", self.queue_actions)
        r.add_get("/queue/messages/{queue_id}", self.one_message)
        r.add_delete("/queue/messages/{queue_id}", self.one_message)
        r.add_post("/queue/messages/{queue_id}/{action}", self.one_message)
        r.add_post("/reload", self.reload)
        r.add_get("/status", self.status_page)
        r.add_get("/status.json", self.status_json)
        r.add_get("/status/login", self.first)
        r.add_post("/status/login", self.first)
        add_notify_routes(r, self.fanout.all, self.first)  # /events, /trace, /suppression
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "workers": len(self.fanout.sockets)})

    async def readyz(self, request: web.Request) -> web.Response:
        answers, down = await self.fanout.all(request, b"")
        ready = not down and all(a.status == 200 for a in answers)
        queued = [a.json().get("queued") for a in answers if a.status == 200]
        body = {
            "ready": ready,
            "listeners": self.listeners() if ready else {},
            "queued": sum(q for q in queued if isinstance(q, int)) if ready else None,
            "workers": len(self.fanout.sockets),
            "unavailable_workers": down + [a.worker for a in answers if a.status != 200],
        }
        full = {a.worker: _spool_full(a) for a in answers if a.status != 200}
        if any(full.values()):
            body["spool_full"] = {w: why for w, why in full.items() if why}
        return _json(body, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        answers, down = await self.fanout.all(request, b"")
        texts = [a.body.decode() for a in answers if a.status == 200]
        n = len(self.fanout.sockets)
        texts.append(
            "# HELP relay_workers Worker processes configured.\n# TYPE relay_workers gauge\n"
            f"relay_workers {n}\n"
            "# HELP relay_workers_up Worker processes that answered this scrape.\n"
            f"# TYPE relay_workers_up gauge\nrelay_workers_up {len(texts)}\n"
        )
        return web.Response(
            text=merge_metrics(texts), content_type="text/plain", charset="utf-8",
            headers={"X-Relay-Unavailable-Workers": ",".join(map(str, down))} if down else None,
        )

    async def first(self, request: web.Request) -> web.Response:
        body = await request.read()
        for i in range(len(self.fanout.sockets)):
            try:
                return _reply(await self.fanout.call(i, request, body))
            except WorkerDown:
                continue
        return _down(list(range(len(self.fanout.sockets))))

    async def test_upstream(self, request: web.Request) -> web.Response:
        """One worker tests; when it succeeds for a configured upstream, every worker ends
        its pause of that upstream (each found the problem on its own)."""
        body = await request.read()
        for i in range(len(self.fanout.sockets)):
            try:
                answer = await self.fanout.call(i, request, body)
            except WorkerDown:
                continue
            name = json.loads(body or b"{}").get("upstream") if answer.status == 200 else None
            if name and answer.json().get("ok"):
                await self.fanout.post_all(f"/upstreams/{quote(str(name), safe='/')}/resume",
                                           request)
            return _reply(answer)
        return _down(list(range(len(self.fanout.sockets))))

    async def resume(self, request: web.Request) -> web.Response:
        answers, down = await self.fanout.all(request, b"")
        if down:
            return _down(down)
        out = answers[0].json()
        out["was_paused"] = any(a.json().get("was_paused") for a in answers if a.status == 200)
        return _json(out, answers[0].status)

    async def upstreams(self, request: web.Request) -> web.Response:
        """Each worker's pauses (any worker paused: paused); verification from the first."""
        answers, down, bad = await self._views(request)
        if bad is not None:
            return bad
        merged: dict[str, Any] = {}
        for a in answers:
            for uid, entry in a.json().get("upstreams", {}).items():
                have = merged.setdefault(uid, entry)
                if have.get("paused") is None and entry.get("paused") is not None:
                    have["paused"] = entry["paused"]
        return _json({"upstreams": merged, "unavailable_workers": down})

    async def _views(self, request: web.Request) -> tuple[list[Answer], list[int], web.Response | None]:
        answers, down = await self.fanout.all(request, b"")
        bad = next((a for a in answers if a.status != 200), None)
        return answers, down, _reply(bad) if bad is not None else None

    async def queue_summary(self, request: web.Request) -> web.Response:
        answers, down, bad = await self._views(request)
        if bad is not None:
            return bad
        out = merge_summaries([a.json() for a in answers])
        out["unavailable_workers"] = down
        return _json(out)

    async def _status(self, request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
        answers, down = await self.fanout.all(request, b"", path="/status.json")
        refused = next((a for a in answers if a.status != 200), None)
        if refused is not None:  # no or a wrong token: each worker says the same
            return None, _reply(refused)
        merged = merge_status([a.json() for a in answers], workers=len(self.fanout.sockets),
                              down=down)
        return merged, None

    async def status_json(self, request: web.Request) -> web.Response:
        merged, refused = await self._status(request)
        return refused or _json(merged)

    async def status_page(self, request: web.Request) -> web.Response:
        merged, refused = await self._status(request)
        if refused is not None:
            if refused.status == 401:  # a browser without the cookie: the login form
                return web.Response(text=login_page(), status=401, content_type="text/html")
            return refused
        if merged is None or "queue" not in merged:
            return _down(list(range(len(self.fanout.sockets))))
        return web.Response(text=render_status(merged), content_type="text/html")

    async def queue_shape(self, request: web.Request) -> web.Response:
        answers, down, bad = await self._views(request)
        if bad is not None:
            return bad
        out = merge_shapes([a.json() for a in answers])
        out["unavailable_workers"] = down
        return _json(out)

    async def queue_list(self, request: web.Request) -> web.Response:
        answers, down, bad = await self._views(request)
        if bad is not None:
            return bad
        try:
            limit = int(request.query.get("limit", 1000))
        except ValueError:
            limit = 1000
        messages = [m for a in answers for m in a.json().get("messages", [])]
        messages.sort(key=lambda m: (m.get("received_at") or 0.0, m.get("queue_id") or ""))
        messages = messages[: max(1, limit)]
        return _json({"count": len(messages), "messages": messages, "unavailable_workers": down})

    async def one_message(self, request: web.Request) -> web.Response:
        """Show or act on one queue id: the worker whose shard has it answers."""
        body = await request.read()
        answers, down = await self.fanout.all(request, body)
        found = [a for a in answers if a.status != 404]
        if found:
            return _reply(found[0])
        if down:
            return _down(down)
        return _reply(answers[0])

    async def queue_actions(self, request: web.Request) -> web.Response:
        body = await request.read()
        answers, down = await self.fanout.all(request, body)
        bad = next((a for a in answers if a.status != 200), None)
        if bad is not None:
            return _reply(bad)
        if down:
            return _down(down)
        results: dict[str, dict[str, Any]] = {}
        action = None
        for a in answers:
            data = a.json()
            action = data.get("action", action)
            for qid, res in data.get("results", {}).items():
                if qid not in results or results[qid].get("result") == "not_found":
                    results[qid] = res
        counts: dict[str, int] = {}
        for res in results.values():
            counts[res["result"]] = counts.get(res["result"], 0) + 1
        return _json({"action": action, "matched": len(results), "counts": counts,
                      "results": results})

    async def reload(self, request: web.Request) -> web.Response:
        answers, down = await self.fanout.all(request, b"")
        if down:
            return _down(down)
        refused = next((a for a in answers if a.status != 200), None)
        if refused is not None:
            return _reply(refused)
        self.on_reloaded()
        return _reply(answers[0])


class FanoutServer:
    def __init__(self, api: FanoutApi, address: str, port: int) -> None:
        self.api = api
        self.address = address
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        await self.api.fanout.start()
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        self.port = await start_tcp_site(self._runner, self.address, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.api.fanout.close()
