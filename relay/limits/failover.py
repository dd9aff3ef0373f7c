"""Shared limits that survive losing Redis: fall back to conservative local limits, or tempfail.

`Failover` is a `Store` in front of the shared one. The first backend error switches the
node to *degraded*: it logs once, sets the `relay_limits_backend_degraded` gauge and then
either counts locally, each shared limit scaled down to `fallback_share` (so N nodes on
their own stay near the shared total), or raises `BackendUnavailable` (`tempfail`: intake
answers 451, deliveries wait). Every `redis_retry` seconds one call tries Redis again; the
first success switches back (logged once, gauge cleared). Either way no mail is lost: a
limit only decides when mail goes.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from limits.errors import StorageError

from relay.limits.store import BackendError, Lease, MemoryStore, Store, Window

log = logging.getLogger("relay.limits")

T = TypeVar("T")

# What a broken or unreachable backend raises (the Redis store turns redis-py's errors into
# BackendError, the `limits` library's into StorageError; asyncio timeouts are TimeoutError;
# the machine store's SQLite file says "disk is full" or "database is locked" as
# sqlite3.Error).
BACKEND_ERRORS: tuple[type[BaseException], ...] = (
    BackendError, StorageError, OSError, TimeoutError, sqlite3.Error,
)


class BackendUnavailable(Exception):
    """The shared limits backend is down and on_backend_failure is `tempfail`."""

    def __init__(self, retry_in: float) -> None:
        super().__init__("the shared limits backend is unavailable")
        self.retry_in = retry_in


class Failover(Store):
    shared = True

    def __init__(
        self,
        primary: Store,
        *,
        share: float,
        mode: str,
        retry: float,
        on_change: Callable[[bool], None] = lambda degraded: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary = primary
        self.local = MemoryStore("fallback")
        self.share = share
        self.mode = mode
        self.retry = retry
        self.degraded = False
        self._on_change = on_change
        self._clock = clock
        self._next_probe = 0.0

    async def _run(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T:
        now = self._clock()
        if not self.degraded or now >= self._next_probe:
            if self.degraded:
                self._next_probe = now + self.retry  # one probe per interval, not one per call
            try:
                result = await shared()
            except BACKEND_ERRORS as exc:
                self._next_probe = now + self.retry
                if not self.degraded:
                    self.degraded = True
                    log.error(
                        "limits backend unreachable (%s: %s); %s until it is back",
                        type(exc).__name__,
                        exc,
                        "enforcing local limits at %.0f%% of the shared ones" % (self.share * 100)
                        if self.mode == "local"
                        else "refusing new mail with 451 and holding deliveries",
                    )
                    self._on_change(True)
            else:
                if self.degraded:
                    self.degraded = False
                    log.warning("limits backend reachable again; shared limits restored")
                    self._on_change(False)
                return result
        if self.mode != "local":
            raise BackendUnavailable(max(1.0, self._next_probe - now))
        return await local()

    # -- Store ---------------------------------------------------------------------------
    async def consume(
        self, windows: Sequence[Window], *, fixed: bool
    ) -> tuple[Window, float] | None:
        scaled = [w.scaled(self.share) for w in windows]
        return await self._run(
            lambda: self.primary.consume(windows, fixed=fixed),
            lambda: self.local.consume(scaled, fixed=fixed),
        )

    async def used(self, w: Window, *, fixed: bool) -> int:
        return await self._run(
            lambda: self.primary.used(w, fixed=fixed),
            lambda: self.local.used(w.scaled(self.share), fixed=fixed),
        )

    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        local_limit = max(1, math.floor(limit * self.share))
        return await self._run(
            lambda: self.primary.lease(key, limit, ttl),
            lambda: self.local.lease(key, local_limit, ttl),
        )

    async def unlease(self, lease: Lease) -> None:
        # A lease goes back to the store that granted it; if that is unreachable the
        # lease simply expires there.
        try:
            await lease.store.unlease(lease)
        except BACKEND_ERRORS:
            pass

    async def renew(self, leases: Sequence[Lease], ttl: float) -> None:
        for store in {lease.store for lease in leases}:
            try:
                await store.renew([x for x in leases if x.store is store], ttl)
            except BACKEND_ERRORS:
                pass

    async def leases(self, key: str) -> int:
        return await self._run(lambda: self.primary.leases(key), lambda: self.local.leases(key))

    async def space(self, key: str, interval: float) -> float:
        return await self._run(
            lambda: self.primary.space(key, interval),
            lambda: self.local.space(key, interval / self.share),
        )

    async def pause(self, key: str, seconds: float, reason: str = "") -> None:
        await self._run(
            lambda: self.primary.pause(key, seconds, reason),
            lambda: self.local.pause(key, seconds, reason),
        )

    async def paused_why(self, key: str) -> tuple[float, str]:
        return await self._run(
            lambda: self.primary.paused_why(key), lambda: self.local.paused_why(key)
        )

    async def close(self) -> None:
        await self.primary.close()
