"""The webhook sender: each endpoint's outbox (the spool's events after its cursor that it
subscribes to) posted in signed batches over HTTPS, at least once, in order.

One task per endpoint: read up to `batch_size` events after the endpoint's cursor, POST them
(aiohttp, certificates verified), and only on a 2xx answer move the cursor (durably, in the
spool). A failure (refused, timeout, TLS, non-2xx) is retried with backoff from
`retry_initial` doubling to `retry_max`; meanwhile events wait in the spool, surviving
restarts and kill -9 (an event posted but not yet acknowledged is posted again: receivers
de-duplicate by event id).

Bounds (checked every `CHECK` seconds): when an endpoint's outbox holds more than
`max_backlog` events, or events older than `max_age`, the oldest are skipped for it — counted
in `relay_webhook_events_dropped_total`, logged with the seq range, and still in the event log
for `relay events replay` until `events.retention` prunes them. The outbox's depth and oldest
age are gauges, and a warning is logged as it passes 50% and 80% of `max_backlog`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge

from relay.config.model import Config
from relay.config.notify import WebhookConf
from relay.config.secrets import SecretUnavailable, resolve_secret
from relay.core.redact import REDACTOR, redact
from relay.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from relay.spool import Spool, StoredEvent

log = logging.getLogger("relay.webhook")

IDLE_POLL = 0.25  # seconds between looks at an empty outbox
# A batch that is not full waits until this long after the previous call (like Kafka's
# linger.ms): under load the calls carry full batches instead of a few events each.
LINGER = 0.25
CHECK = 5.0  # seconds between outbox bound checks (depth, age)
PRUNE_EVERY = 600.0
USER_AGENT = "egress-relay-webhook/1"


@dataclass(frozen=True)
class Endpoint:
    name: str  # "platform", or "acme/crm" for an organisation's own
    org: str | None  # None: every organisation's events
    conf: WebhookConf
    base_dir: Path

    @property
    def types(self) -> list[str] | None:
        return None if len(set(self.conf.events)) >= 12 else list(self.conf.events)


def endpoints_of(config: Config) -> list[Endpoint]:
    out = [Endpoint(n, None, c, config.base_dir) for n, c in config.relay.webhooks.items()]
    for org in config.orgs.values():
        out.extend(Endpoint(f"{org.id}/{n}", org.id, c, config.base_dir)
                   for n, c in org.webhooks.items())
    return out


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.depth = Gauge("relay_webhook_outbox_events", "Events waiting for an endpoint",
                           ["endpoint"], registry=r)
        self.oldest = Gauge("relay_webhook_outbox_oldest_age_seconds",
                            "Age of the oldest event waiting for an endpoint", ["endpoint"],
                            registry=r)
        self.sent = Counter("relay_webhook_events_sent", "Events acknowledged by an endpoint",
                            ["endpoint"], registry=r)
        self.posts = Counter("relay_webhook_posts", "Webhook calls by result",
                             ["endpoint", "result"], registry=r)
        self.dropped = Counter("relay_webhook_events_dropped",
                               "Events skipped for an endpoint because its outbox was full",
                               ["endpoint"], registry=r)


@dataclass
class EndpointState:
    endpoint: Endpoint
    acked: int = 0
    depth: int = 0
    oldest: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    last_success_at: float | None = None
    failures: int = 0  # consecutive
    dropped: int = 0
    warned: int = 0  # the highest fill threshold (50, 80, 100) already logged
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def as_dict(self, now: float) -> dict[str, Any]:
        e = self.endpoint
        return {
            "endpoint": e.name, "url": e.conf.url, "org": e.org, "types": e.types,
            "acked_seq": self.acked, "depth": self.depth, "oldest_ts": self.oldest,
            "oldest_age": None if self.oldest is None else round(max(0.0, now - self.oldest), 1),
            "last_error": self.last_error, "last_error_at": self.last_error_at,
            "last_success_at": self.last_success_at, "failures": self.failures,
            "dropped": self.dropped, "max_backlog": e.conf.max_backlog,
            "max_age": e.conf.max_age,
        }


def _context(conf: WebhookConf, base_dir: Path) -> ssl.SSLContext:
    cafile = str(base_dir / conf.ca_file) if conf.ca_file else None
    ctx = ssl.create_default_context(cafile=cafile)
    if not conf.verify_tls:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def batch_body(stream: str, events: Sequence[StoredEvent]) -> bytes:
    """{"stream": ..., "events": [...]}: each stored event's JSON with its seq and stream
    added (by text: the stored JSON is an object, so its last byte is '}')."""
    tail = f',"seq":%d,"stream":"{stream}"}}'
    items = ",".join(e.row.data[:-1] + tail % e.seq for e in events)
    return f'{{"stream":"{stream}","events":[{items}]}}'.encode()


class WebhookSender:
    """Every endpoint of one spool shard, plus the event log's pruning."""

    def __init__(self, spool: Spool, registry: CollectorRegistry, stream: str, config: Config,
                 *, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.stream = stream
        self.metrics = WebhookMetrics(registry)
        self.clock = clock
        self.config = config
        self.states: dict[str, EndpointState] = {}
        self._session: aiohttp.ClientSession | None = None
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    async def start(self) -> None:
        self._running = True
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": USER_AGENT},
            connector=aiohttp.TCPConnector(limit=64),
        )
        await self._apply(self.config)
        t = asyncio.create_task(self._maintain(), name="webhook-maintain")
        self._tasks.add(t)

    async def reconfigure(self, config: Config) -> None:
        self.config = config
        if self._running:
            await self._apply(config)

    async def _apply(self, config: Config) -> None:
        wanted = {e.name: e for e in endpoints_of(config)}
        cursors = await self.spool.events.cursors()
        last, _, _ = await self.spool.events.stats()
        for name in list(self.states):
            if name not in wanted:
                st = self.states.pop(name)
                if st.task is not None:
                    st.task.cancel()
        for name, ep in wanted.items():
            known = self.states.get(name)
            if known is not None:
                known.endpoint = ep
                self._contexts.pop(name, None)
                continue
            if name not in cursors:
                # A new endpoint starts with the events from now on (`relay events replay`
                # sends older ones); its cursor is stored so a restart does not move it.
                await self.spool.events.set_cursor(name, last)
                cursors[name] = last
            st = self.states[name] = EndpointState(ep, acked=cursors[name])
            st.task = asyncio.create_task(self._run(st), name=f"webhook-{name}")

    async def close(self) -> None:
        self._running = False
        tasks = [st.task for st in self.states.values() if st.task] + list(self._tasks)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._session is not None:
            await self._session.close()

    def kick(self) -> None:
        """New events were written: look now instead of at the next poll."""
        for st in self.states.values():
            st.wake.set()

    # -- one endpoint -------------------------------------------------------------------
    async def _run(self, st: EndpointState) -> None:
        delay = st.endpoint.conf.retry_initial
        last_call = 0.0
        while self._running:
            ep = st.endpoint
            try:
                batch = await self.spool.events.after(
                    st.acked, ep.conf.batch_size, types=ep.types, org=ep.org)
            except Exception as exc:
                log.warning("webhook %s: reading the outbox failed: %s", ep.name, exc)
                await asyncio.sleep(1.0)
                continue
            if not batch:
                st.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.wake.wait(), IDLE_POLL)
                continue
            linger = last_call + LINGER - time.monotonic()
            if len(batch) < ep.conf.batch_size and linger > 0:
                await asyncio.sleep(linger)
                continue  # read again: the batch has grown
            last_call = time.monotonic()
            error = await self._post(st, batch)
            if error is None:
                st.acked = batch[-1].seq
                await self.spool.events.set_cursor(ep.name, st.acked)
                st.depth = max(0, st.depth - len(batch))
                st.failures = 0
                st.last_success_at = self.clock()
                self.metrics.sent.labels(ep.name).inc(len(batch))
                self.metrics.posts.labels(ep.name, "ok").inc()
                delay = ep.conf.retry_initial
                continue
            st.failures += 1
            st.last_error = error
            st.last_error_at = self.clock()
            self.metrics.posts.labels(ep.name, "failed").inc()
            if st.failures == 1 or st.failures % 10 == 0:
                log.warning("webhook %s: %s (%d failed calls in a row; retrying in %.0fs)",
                            ep.name, error, st.failures, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, ep.conf.retry_max)

    async def _post(self, st: EndpointState, batch: Sequence[StoredEvent]) -> str | None:
        """None when the endpoint acknowledged the batch, else why not (for people)."""
        ep = st.endpoint
        assert self._session is not None
        try:
            secret = resolve_secret(ep.conf.secret, base_dir=ep.base_dir).reveal()
        except SecretUnavailable as exc:
            return f"secret {ep.conf.secret}: {exc}"
        REDACTOR.add(secret)
        ctx = self._contexts.get(ep.name)
        if ctx is None:
            try:
                ctx = self._contexts[ep.name] = _context(ep.conf, ep.base_dir)
            except (OSError, ssl.SSLError) as exc:
                return f"TLS settings: {exc}"
        body = batch_body(self.stream, batch)
        ts = int(self.clock())
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(secret, ts, body),
            "X-Relay-Stream": self.stream,
            "X-Relay-Batch": f"{batch[0].seq}-{batch[-1].seq}",
        }
        try:
            async with self._session.post(
                ep.conf.url, data=body, headers=headers, ssl=ctx,
                timeout=aiohttp.ClientTimeout(total=ep.conf.timeout), allow_redirects=False,
            ) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()
                    return None
                text = (await resp.content.read(200)).decode("utf-8", "replace")
                return redact(f"HTTP {resp.status}: {' '.join(text.split())}")
        except aiohttp.ClientSSLError as exc:
            return redact(f"TLS: {exc}")
        except (aiohttp.ClientError, OSError) as exc:
            return redact(f"{type(exc).__name__}: {exc}")
        except TimeoutError:
            return f"no answer within {ep.conf.timeout:g}s"

    # -- bounds, gauges, pruning --------------------------------------------------------
    async def _maintain(self) -> None:
        last_prune = 0.0
        while self._running:
            for st in list(self.states.values()):
                try:
                    await self.check(st)
                except Exception:
                    log.exception("webhook %s: outbox check failed", st.endpoint.name)
            now = self.clock()
            if now - last_prune >= PRUNE_EVERY:
                last_prune = now
                await self.prune()
            await asyncio.sleep(CHECK)

    async def prune(self) -> int:
        ec = self.config.relay.events
        try:
            n = await self.spool.events.prune(self.clock() - ec.retention, ec.max_events, None)
        except Exception as exc:
            log.warning("event log: pruning failed: %s", exc)
            return 0
        if n:
            log.info("event log: pruned %d event(s) past retention", n)
        return n

    async def check(self, st: EndpointState) -> None:
        """Update the gauges; enforce max_backlog and max_age (the rule when full)."""
        ep = st.endpoint
        ev = self.spool.events
        now = self.clock()
        depth, oldest = await ev.count_after(st.acked, types=ep.types, org=ep.org)
        skip_to = st.acked
        if depth > ep.conf.max_backlog:
            skip_to = await ev.nth_after(st.acked, depth - ep.conf.max_backlog,
                                         types=ep.types, org=ep.org)
        if oldest is not None and oldest < now - ep.conf.max_age:
            skip_to = max(skip_to, await ev.seq_at(now - ep.conf.max_age))
        if skip_to > st.acked:
            skipped, _ = await ev.count_after(st.acked, types=ep.types, org=ep.org,
                                              upto=skip_to)
            log.error("webhook %s: outbox full (max_backlog %d, max_age %.0fs): skipping %d"
                      " event(s), seq %d-%d; `relay events replay` can resend them while the"
                      " event log keeps them", ep.name, ep.conf.max_backlog, ep.conf.max_age,
                      skipped, st.acked + 1, skip_to)
            st.acked = skip_to
            await ev.set_cursor(ep.name, skip_to)
            st.dropped += skipped
            self.metrics.dropped.labels(ep.name).inc(skipped)
            depth, oldest = await ev.count_after(st.acked, types=ep.types, org=ep.org)
        st.depth, st.oldest = depth, oldest
        self.metrics.depth.labels(ep.name).set(depth)
        self.metrics.oldest.labels(ep.name).set(0 if oldest is None else max(0.0, now - oldest))
        fill = 100 * depth // max(1, ep.conf.max_backlog)
        level = 80 if fill >= 80 else 50 if fill >= 50 else 0
        if level > st.warned:
            log.warning("webhook %s: outbox %d%% full (%d of %d events; oldest %.0fs); %s",
                        ep.name, fill, depth, ep.conf.max_backlog,
                        0 if oldest is None else now - oldest, st.last_error or "no error yet")
        st.warned = level

    # -- operator views -----------------------------------------------------------------
    async def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for st in self.states.values():
            await self.check(st)
            out.append(st.as_dict(now) | {"stream": self.stream})
        return out

    async def replay(self, endpoint: str | None, *, since: float | None = None,
                     event_id: str | None = None) -> dict[str, Any]:
        """Move endpoint cursors back so events from `since` (or after `event_id`) go out
        again. Returns what was done per endpoint."""
        ev = self.spool.events
        if event_id is not None:
            seq = await ev.seq_of(event_id)
            if seq is None:
                return {"stream": self.stream, "found": False, "endpoints": {}}
            start = seq - 1
        else:
            start = await ev.seq_at(since or 0.0)
        done = {}
        for name, st in self.states.items():
            if endpoint is not None and name != endpoint:
                continue
            if start < st.acked:
                st.acked = start
                await ev.set_cursor(name, start)
                st.wake.set()
            done[name] = {"from_seq": start + 1}
        return {"stream": self.stream, "found": True, "endpoints": done}
