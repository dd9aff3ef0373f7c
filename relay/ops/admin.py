"""The admin HTTP API (aiohttp): health, readiness, metrics, egress IPs, the queue and its
actions, reload, and test connection. Documented in docs/openapi.yaml.

Bound to loopback by default. `/healthz`, `/readyz` and `/metrics` are open (the usual
contract for probes and Prometheus scrapers on loopback); everything else needs
`Authorization: Bearer <admin.token>`, compared in constant time. With no token configured
those endpoints answer 403 and say so: an admin API without a token is read-only by design.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.config.model import Config
from relay.config.units import parse_duration
from relay.delivery import DnsResolver
from relay.events import MailLog, Metrics
from relay.notify.suppression import SuppressionList
from relay.notify.webhook import WebhookSender
from relay.oauth import TokenBroker
from relay.ops.http import error_response as _error
from relay.ops.http import json_response as _json
from relay.ops.http import start_tcp_site
from relay.ops.notify_api import NotifyApi
from relay.ops.probe import TargetError, adhoc_upstream, configured_upstream, probe, sources_for
from relay.ops.queueops import ACTIONS, Filters, QueueOps
from relay.ops.shape import BY, queue_shape
from relay.ops.status import node_status
from relay.ops.statuspage import COOKIE, cookie_valid, login_page, status_cookie
from relay.ops.statuspage import render as render_status
from relay.ops.verify import confirm, send_code
from relay.policy.egress import as_dict, render
from relay.scheduler import Scheduler
from relay.spool import Spool


class RunningRelay(Protocol):
    """What the API reads and asks of the running relay (relay.runtime.node.Relay)."""

    config: Config
    scheduler: Scheduler
    spool: Spool
    metrics: Metrics
    tokens: TokenBroker
    events: MailLog
    ready: bool
    reload_errors: list[str]
    webhooks: WebhookSender
    suppression: SuppressionList

    def listening(self) -> dict[str, int]:
        """Listener name -> bound port."""
        ...

    async def reload(self) -> bool: ...

log = logging.getLogger("relay.admin")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/status/login"})
# Read-only views a browser may open with the status cookie instead of the bearer token.
STATUS_PATHS = frozenset({"/status", "/status.json"})
NO_TOKEN = (
    "the admin API has no token configured (admin.token in relay.yaml): only /healthz, /readyz"
    " and /metrics are served"
)
MAX_PROBE_TIMEOUT = 60.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminApi:
    """The routes; `relay` is the running Relay (its current config, scheduler, spool)."""

    def __init__(self, relay: RunningRelay, token: str | None) -> None:
        self.relay = relay
        self.token = token

    def set_token(self, token: str | None) -> None:
        """Reload: the token is a secret, re-read like the others."""
        self.token = token

    @property
    def ops(self) -> QueueOps:
        return QueueOps(self.relay.scheduler, self.relay.spool)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/egress-ips", self.egress_ips)
        r.add_get("/queue", self.queue_summary)
        r.add_get("/queue/messages", self.queue_list)
        r.add_get("/queue/shape", self.queue_shape)
        r.add_post("/queue/actions", self.queue_actions)
        r.add_get("/queue/messages/{queue_id}", self.queue_show)
        r.add_delete("/queue/messages/{queue_id}", self.queue_delete)
        r.add_post("/queue/messages/{queue_id}/{action}", self.queue_action)
        r.add_post("/reload", self.reload)
        r.add_get("/status", self.status_page)
        r.add_get("/status.json", self.status_json)
        r.add_get("/status/login", self.status_login)
        r.add_post("/status/login", self.status_login)
        r.add_post("/test-upstream", self.test_upstream)
        r.add_get("/upstreams", self.upstreams)
        r.add_post("/upstreams/{name:.+}/verify", self.verify_upstream)
        r.add_post("/upstreams/{name:.+}/resume", self.resume_upstream)
        NotifyApi(self.relay).add_routes(r)  # /events, /trace, /suppression
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if not self.token:
            return _error(403, NO_TOKEN)
        if (
            request.method == "GET"
            and request.path in STATUS_PATHS
            and cookie_valid(self.token, request.cookies.get(COOKIE))
        ):
            return await handler(request)
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        ):
            if request.path == "/status":
                return web.Response(text=login_page(), status=401, content_type="text/html")
            resp = _error(401, "missing or wrong token (Authorization: Bearer <admin token>)")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="egress-relay"'
            return resp
        return await handler(request)

    # -- open -------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        r = self.relay
        full = r.spool.full  # listening, but every new message would get 451: not ready
        ready = r.ready and full is None
        body = {
            "ready": ready,
            "listeners": r.listening() if ready else {},
            "queued": (await r.spool.count())[0] if ready else None,
        }
        if full is not None:
            body["spool_full"] = full
        return _json(body, 200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        m = self.relay.metrics
        # Queue depth and oldest age come from the spool (the whole queue, not the scheduler's
        # in-memory part) at scrape time: a gauge that is only updated on events would go
        # stale when nothing happens (the worrying case).
        depth = await self.relay.spool.depth()
        now = time.time()
        m.spool_full.set(0 if self.relay.spool.full is None else 1)
        m.queue_depth.clear()
        m.queue_oldest.clear()
        for upstream, (n, oldest) in depth.items():
            m.queue_depth.labels(upstream or "unrouted").set(n)
            m.queue_oldest.labels(upstream or "unrouted").set(max(0.0, now - oldest))
        m.upstream_paused.clear()
        for uid, p in self.relay.scheduler.health.snapshot().items():
            m.upstream_paused.labels(uid, p["kind"]).set(1)
        messages, held = await self.relay.spool.count()
        m.waiting.clear()
        for g in self.ops.waiting(messages, held, now):
            m.waiting.labels(g["kind"]).inc(g["messages"])
        try:
            fs = os.statvfs(self.relay.spool.directory)
            m.spool_fs_avail.set(fs.f_bavail * fs.f_frsize)
            m.spool_fs_size.set(fs.f_blocks * fs.f_frsize)
        except OSError:
            pass  # the gauges keep their last value; /readyz tells about the spool itself
        body = generate_latest(m.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status_login(self, request: web.Request) -> web.Response:
        """The status page's login: the admin token once, then a cookie derived from it."""
        if not self.token:
            return _error(403, NO_TOKEN)
        if request.method == "GET":
            return web.Response(text=login_page(), content_type="text/html")
        form = await request.post()
        given = str(form.get("token", "")).strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return web.Response(text=login_page("wrong token"), status=401,
                                content_type="text/html")
        resp = web.Response(status=303, headers={"Location": "/status"})
        # Path "/": a cookie for "/status" would not reach "/status.json". It opens only the
        # read-only STATUS_PATHS.
        resp.set_cookie(COOKIE, status_cookie(self.token), httponly=True, samesite="Strict",
                        path="/")
        return resp

    # -- token --------------------------------------------------------------------------
    async def status_json(self, request: web.Request) -> web.Response:
        return _json(await node_status(self.relay))

    async def status_page(self, request: web.Request) -> web.Response:
        return web.Response(text=render_status(await node_status(self.relay)),
                            content_type="text/html")

    async def egress_ips(self, request: web.Request) -> web.Response:
        config = self.relay.config
        pool = request.query.get("pool")
        if pool is not None and pool not in config.pools:
            return _error(404, f"unknown pool '{pool}'")
        fmt = request.query.get("format")
        if fmt is None:
            fmt = "text" if "text/plain" in request.headers.get("Accept", "") else "json"
        if fmt == "json":
            return _json(as_dict(config, pool))
        if fmt in ("text", "spf"):
            return web.Response(text=render(config, pool, fmt) + "\n")
        return _error(400, "format must be json, text or spf")

    async def queue_summary(self, request: web.Request) -> web.Response:
        return _json(await self.ops.summary())

    @staticmethod
    def _filters(q: Any) -> Filters:
        older = q.get("older_than")
        try:
            return Filters(
                org=q.get("org") or None,
                account=q.get("account") or None,
                upstream=q.get("upstream") or None,
                older_than=parse_duration(older) if older not in (None, "") else None,
                limit=int(q.get("limit", 1000)),
            )
        except (ValueError, TypeError) as exc:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": str(exc)}), content_type="application/json"
            ) from None

    async def queue_shape(self, request: web.Request) -> web.Response:
        by = request.query.get("by", "upstream")
        if by not in BY:
            return _error(400, f"by: want one of {', '.join(BY)}")
        return _json(await queue_shape(self.relay.spool, by))

    async def queue_list(self, request: web.Request) -> web.Response:
        f = self._filters(request.query)
        messages = await self.ops.messages(f)
        return _json({"count": len(messages), "messages": messages})

    async def queue_show(self, request: web.Request) -> web.Response:
        qid = request.match_info["queue_id"]
        shown = await self.ops.show(qid)
        return _json(shown) if shown is not None else _error(404, f"{qid}: not in the queue")

    async def _act(self, action: str, qid: str, reason: str | None) -> web.Response:
        result, text = await self.ops.act(action, qid, reason=reason)
        status = {"ok": 200, "not_found": 404, "conflict": 409}[result]
        return _json({"queue_id": qid, "action": action, "result": result, "text": text}, status)

    async def queue_delete(self, request: web.Request) -> web.Response:
        return await self._act("delete", request.match_info["queue_id"], None)

    async def queue_action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ACTIONS or action == "delete":
            return _error(404, f"unknown action '{action}' (retry, hold, release, bounce)")
        body = await self._body(request, optional=True)
        return await self._act(action, request.match_info["queue_id"], body.get("reason"))

    async def queue_actions(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        action = body.get("action")
        if action not in ACTIONS:
            return _error(400, f"action must be one of {', '.join(ACTIONS)}")
        ids = body.get("ids")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            return _error(400, "ids must be a list of queue ids")
        f = self._filters(body)
        if ids is None and f.empty and not body.get("all"):
            return _error(
                400, "give ids, a filter (org, account, upstream, older_than) or all: true"
            )
        return _json(await self.ops.act_many(action, ids, f, reason=body.get("reason")))

    async def reload(self, request: web.Request) -> web.Response:
        ok = await self.relay.reload()
        if ok:
            return _json({"reloaded": True, "warnings": self.relay.config.warnings})
        return _json(
            {
                "reloaded": False,
                "errors": self.relay.reload_errors,
                "note": "the previous configuration keeps running",
            },
            422,
        )

    async def test_upstream(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        config = self.relay.config
        opts = {
            k: body.pop(k, None)
            for k in (
                "upstream",
                "pool",
                "source",
                "all_sources",
                "mail_from",
                "rcpt_to",
                "send_to",
                "timeout",
            )
        }
        try:
            if opts["upstream"]:
                if body:
                    return _error(400, "give either upstream or a server description, not both")
                upstream = configured_upstream(config, str(opts["upstream"]))
            else:
                if not body:
                    return _error(400, "give upstream (a configured name) or host, port, tls, ...")
                upstream = adhoc_upstream(config, body)
            sources = sources_for(
                config,
                upstream,
                pool=opts["pool"],
                source=opts["source"],
                all_sources=bool(opts["all_sources"]),
            )
            timeout = float(opts["timeout"]) if opts["timeout"] is not None else 15.0
        except (TargetError, ValueError, TypeError) as exc:
            return _error(400, str(exc))
        timeout = max(0.1, min(timeout, MAX_PROBE_TIMEOUT))
        resolver = DnsResolver(config.relay.dns.hosts, lifetime=config.relay.dns.timeout)
        reports = []
        for src in sources:
            rep = await probe(
                upstream,
                src,
                resolver,
                mail_from=opts["mail_from"],
                rcpt_to=opts["rcpt_to"],
                send_to=opts["send_to"],
                timeout=timeout,
            )
            reports.append(rep.as_dict())
        ok = all(r["ok"] for r in reports)
        log.info(
            "test-upstream %s from %s: %s",
            upstream.id,
            ", ".join(s.address for s in sources),
            "ok" if ok else "failed",
        )
        resumed = False
        if ok and opts["upstream"] and self.relay.scheduler.health.get(upstream.id) is not None:
            self._resume(upstream.id)  # a test that succeeds ends a pause
            resumed = True
        return _json({"ok": ok, "reports": reports, "resumed": resumed})

    # -- upstreams: pauses and the verified switch-over (relay/ops/verify.py) -------------
    async def upstreams(self, request: web.Request) -> web.Response:
        config, sched = self.relay.config, self.relay.scheduler
        paused = sched.health.snapshot()
        store = sched.verification
        out = {}
        for uid, u in sorted(config.upstreams.items()):
            entry: dict[str, Any] = {"host": u.host, "port": u.port, "auth": u.auth,
                                     "provider": u.provider, "paused": paused.get(uid)}
            if u.verify:
                entry["verification"] = store.status(u) if store else {"verified": False}
                entry["previous"] = u.previous
            out[uid] = entry
        return _json({"upstreams": out})

    async def verify_upstream(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await self._body(request)
        store = self.relay.scheduler.verification
        config = self.relay.config
        if store is None:
            return _error(503, "verification is not available in this process")
        try:
            if body.get("code"):
                out = confirm(config, store, name, str(body["code"]))
                return _json({"upstream": name, "verified": out.ok, "text": out.text},
                             200 if out.ok else 409)
            if not body.get("send_to"):
                return _error(400, "give send_to (an address to send the code to) or code")
            resolver = DnsResolver(config.relay.dns.hosts, lifetime=config.relay.dns.timeout)
            timeout = max(0.1, min(float(body.get("timeout") or 15.0), MAX_PROBE_TIMEOUT))
            sent = await send_code(config, store, name, str(body["send_to"]), resolver,
                                   timeout=timeout)
        except (TargetError, ValueError, TypeError) as exc:
            return _error(400 if not str(exc).startswith("unknown upstream") else 404, str(exc))
        return _json(sent, 200 if sent["sent"] else 502)

    async def resume_upstream(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.relay.config.upstreams:
            return _error(404, f"unknown upstream '{name}'")
        was = self.relay.scheduler.health.get(name) is not None
        self._resume(name)
        return _json({"upstream": name, "was_paused": was})

    def _resume(self, name: str) -> None:
        up = self.relay.config.upstreams.get(name)
        if up is not None and up.oauth is not None:
            self.relay.tokens.forget(up)  # no cached refusal or token from before the fix
        self.relay.scheduler.resume(name)

    @staticmethod
    async def _body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
        if optional and not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body must be a JSON object"}),
                content_type="application/json",
            ) from None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body must be a JSON object"}),
                content_type="application/json",
            )
        return body


class AdminServer:
    """The API on its own TCP site; start/stop from the Relay."""

    def __init__(
        self,
        relay: RunningRelay,
        address: str,
        port: int,
        token: str | None,
        *,
        unix_path: str | None = None,
    ) -> None:
        self.api = AdminApi(relay, token)
        self.address = address
        self.requested_port = port
        self.unix_path = unix_path  # a worker's private API for its supervisor
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site: web.BaseSite
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)  # left by a worker that was killed
            site = web.UnixSite(self._runner, self.unix_path)
            await site.start()
            os.chmod(self.unix_path, 0o600)
            return
        self.port = await start_tcp_site(self._runner, self.address, self.requested_port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
