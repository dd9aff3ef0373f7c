"""The upstream gate: whether a delivery to an upstream may start now (the scheduler's `Gate`).

One decision per delivery, in an order that never wastes a quota: a shared pause (an
upstream that said "slow down" to any node), then the quotas are *tested*, then a
concurrency lease, then the minimum interval is reserved, and only then the quotas are
*counted*. Anything that says "not yet" returns the seconds to wait; the scheduler parks the
upstream's whole ready queue that long and the mail waits in the spool, never bounced.

Quotas (`hourly`, `daily`, `quotas: ["N per 10m"]`) are fixed windows that start with the
first message: exactly N messages per window, counted atomically across nodes. Leases are
renewed every `lease_ttl / 3` while deliveries run.

With `on_backend_failure: tempfail` and Redis unreachable, throttled upstreams wait; an
upstream without throttles keeps going (there is nothing to count).

Slow-down: an upstream that answers with a rate-limit reply (421, 451 4.7.x, the SendGrid
and Mailjet throttling texts; relay.delivery.outcome) pauses for `slow_down_initial`, then
twice as long each time it does it again right after a pause, up to `slow_down_max`; one
delivered message resets it. Replies from deliveries that started before the pause do not
escalate it. With Redis the pause is shared: every node's queue for that upstream waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relay.core.model import Upstream
from relay.events import Metrics
from relay.limits.failover import BACKEND_ERRORS, BackendUnavailable
from relay.limits.store import Lease, Store, Window

log = logging.getLogger("relay.limits")

LEASE_POLL = 0.25  # all slots taken (maybe on another node): look again this soon


def quota_windows(upstream: Upstream) -> list[Window]:
    t = upstream.throttle
    spans = [(t.hourly, 3600), (t.daily, 86400), *t.quotas]
    label = f"upstream {upstream.id}"
    return [
        Window(label, n, seconds, ("quota", upstream.id, str(seconds)))
        for n, seconds in spans
        if n is not None
    ]


@dataclass
class _Backoff:
    level: int = 0
    until: float = 0.0


class UpstreamGate:
    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        *,
        lease_ttl: float = 30.0,
        slow_down_initial: float = 30.0,
        slow_down_max: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.lease_ttl = lease_ttl
        self.slow_down_initial = slow_down_initial
        self.slow_down_max = slow_down_max
        self.clock = clock
        self._held: dict[str, list[Lease]] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the scheduler's Gate protocol ---------------------------------------------------
    def local_cap(self, limit: int) -> int:
        return self.store.local_share(limit)

    async def acquire(self, upstream: Upstream) -> float:
        try:
            return await self._acquire(upstream)
        except BackendUnavailable as exc:
            return exc.retry_in
        except BACKEND_ERRORS:  # a plain store outside Failover: wait, never drop
            log.exception("limits backend error for upstream %s", upstream.id)
            return 5.0

    async def _acquire(self, upstream: Upstream) -> float:
        t = upstream.throttle
        key = upstream.id
        try:
            paused = await self.store.paused(key)
        except BackendUnavailable:
            paused = 0.0  # advisory: this node's own pause still holds (the scheduler's)
        if paused > 0:
            return paused
        quotas = quota_windows(upstream)
        lease: Lease | None = None
        if t.max_connections:
            lease = await self.store.lease(key, t.max_connections, self.lease_ttl)
            if lease is None:
                return LEASE_POLL
        try:
            if t.min_interval > 0:
                wait = await self.store.space(key, t.min_interval)
                if wait > 0:
                    raise _NotYet(wait)
            if quotas:
                denied = await self.store.consume(quotas, fixed=True)
                if denied is not None:
                    window, wait = denied
                    log.info(
                        "%s: quota of %s reached; its queue waits %.0fs",
                        window.label,
                        window.describe(),
                        wait,
                    )
                    raise _NotYet(wait)
        except _NotYet as nope:
            if lease is not None:
                await self.store.unlease(lease)
            return nope.wait
        except BaseException:
            if lease is not None:
                await self.store.unlease(lease)
            raise
        if lease is not None:
            self._held.setdefault(key, []).append(lease)
            self._ensure_renewer()
        return 0.0

    async def release(self, upstream: Upstream) -> None:
        held = self._held.get(upstream.id)
        if held:
            lease = held.pop()
            with contextlib.suppress(*BACKEND_ERRORS):
                await self.store.unlease(lease)

    def slow_down(self, upstream: Upstream) -> float:
        now = self.clock()
        b = self._backoff.setdefault(upstream.id, _Backoff())
        if now < b.until:
            return b.until - now  # the same episode: deliveries started before the pause
        b.level += 1
        pause = min(self.slow_down_max, self.slow_down_initial * 2.0 ** (b.level - 1))
        b.until = now + pause
        self.metrics.limit_hits.labels("slow_down").inc()
        self._background(self._share_pause(upstream.id, pause))
        return pause

    def recovered(self, upstream: Upstream) -> None:
        b = self._backoff.get(upstream.id)
        if b is not None and b.level and self.clock() >= b.until:
            b.level = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
            self._renewer = None
        for held in self._held.values():
            for lease in held:
                with contextlib.suppress(*BACKEND_ERRORS):
                    await self.store.unlease(lease)
        self._held.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def in_use(self) -> dict[str, int]:
        """Leases this node holds, by upstream."""
        return {k: len(v) for k, v in self._held.items() if v}

    # -- internals -----------------------------------------------------------------------
    async def _share_pause(self, key: str, seconds: float) -> None:
        with contextlib.suppress(BackendUnavailable, *BACKEND_ERRORS):
            await self.store.pause(key, seconds)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="limits-lease-renewal"
            )

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            leases = [lease for held in self._held.values() for lease in held]
            if leases:
                with contextlib.suppress(BackendUnavailable, *BACKEND_ERRORS):
                    await self.store.renew(leases, self.lease_ttl)


class _NotYet(Exception):
    def __init__(self, wait: float) -> None:
        self.wait = wait
