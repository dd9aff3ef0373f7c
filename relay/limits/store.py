"""Limit state: counting windows, concurrency leases, minimum intervals and pauses.

A `Store` owns the counters; `MemoryStore` keeps them in this process (one node, nothing to
run), `relay.limits.redis_store.RedisStore` in Redis (shared by every node). The rate
strategies are the `limits` library's: a sliding-window counter for intake limits (smooth,
two integers per window) and a fixed window for upstream quotas (one atomic counter per
window, so "exactly N per window" holds across nodes and a daily quota of 100,000 costs one
integer, not 100,000 timestamps). Leases, intervals and pauses are small enough to write
here (the `limits` library has no notion of them).
"""

from __future__ import annotations

import itertools
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)


class BackendError(Exception):
    """A shared store's backend failed (Redis unreachable, a script error): what a store
    raises for its backend's own errors, so callers need not import the backend's library."""


# A denied window is tried again after at least this long (Redis reports expiry in whole
# seconds, so "reset now" can come a little early).
MIN_WAIT = 0.2


@dataclass(frozen=True, slots=True)
class Window:
    """`amount` events per `seconds`, counted under `ident` (identical on every node)."""

    label: str  # for people: "organisation acme"
    amount: int
    seconds: int
    ident: tuple[str, ...]

    @property
    def item(self) -> RateLimitItem:
        return RateLimitItemPerSecond(self.amount, self.seconds, namespace="relay")

    def scaled(self, share: float) -> Window:
        """This node's part of a shared limit while it counts alone."""
        return replace(self, amount=max(1, math.floor(self.amount * share)))

    def describe(self) -> str:
        return f"{self.amount} messages per {span(self.seconds)}"


def span(seconds: int) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds == n:
            return unit
        if seconds % n == 0:
            return f"{seconds // n} {unit}s"
    return "second" if seconds == 1 else f"{seconds} seconds"


@dataclass(frozen=True, slots=True)
class Lease:
    """One concurrency slot, held in `store` until released or expired."""

    store: Store
    key: str
    token: str


class Store(ABC):
    """The operations limits need. Every method may raise the backend's errors."""

    shared = False

    def __init__(
        self, storage: Storage, node_id: str, sliding_storage: Storage | None = None
    ) -> None:
        self._storage = storage
        self._sliding: RateLimiter = SlidingWindowCounterRateLimiter(sliding_storage or storage)
        self._fixed: RateLimiter = FixedWindowRateLimiter(storage)
        self._node = node_id
        self._seq = itertools.count(1)

    def _token(self) -> str:
        return f"{self._node}:{next(self._seq)}"

    # -- counting windows (the `limits` library) ---------------------------------------
    async def consume(
        self, windows: Sequence[Window], *, fixed: bool
    ) -> tuple[Window, float] | None:
        """Count one event in every window if all have room; else the first full window and
        the seconds until it has room. Test-all-then-hit: a message refused by one limit
        uses none of the others. Between nodes the test and the hit are not one atomic
        step, so concurrent nodes may overshoot a *sliding* intake limit by a message or
        two; a fixed-window hit is itself atomic and re-checked, so quotas never overshoot.
        """
        lim = self._fixed if fixed else self._sliding
        for w in windows:
            if not await lim.test(w.item, *w.ident):
                return w, await self._wait(lim, w)
        for w in windows:
            if not await lim.hit(w.item, *w.ident):
                return w, await self._wait(lim, w)
        return None

    async def _wait(self, lim: RateLimiter, w: Window) -> float:
        stats = await lim.get_window_stats(w.item, *w.ident)
        return max(MIN_WAIT, stats.reset_time - time.time())

    async def used(self, w: Window, *, fixed: bool) -> int:
        lim = self._fixed if fixed else self._sliding
        stats = await lim.get_window_stats(w.item, *w.ident)
        return w.amount - stats.remaining

    # -- leases, intervals, pauses -------------------------------------------------------
    @abstractmethod
    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        """A slot if fewer than `limit` unexpired leases exist under `key`."""

    @abstractmethod
    async def unlease(self, lease: Lease) -> None: ...

    @abstractmethod
    async def renew(self, leases: Sequence[Lease], ttl: float) -> None: ...

    @abstractmethod
    async def leases(self, key: str) -> int: ...

    @abstractmethod
    async def space(self, key: str, interval: float) -> float:
        """0 and the next start is `interval` from now, or the seconds until one may start."""

    @abstractmethod
    async def pause(self, key: str, seconds: float, reason: str = "") -> None:
        """Nothing under `key` starts for `seconds` (extends, never shortens, a pause);
        `reason` says why, for people ("slow-down after: 421 4.7.0 ...")."""

    @abstractmethod
    async def paused_why(self, key: str) -> tuple[float, str]:
        """Seconds left of a pause under `key` (0 = not paused) and its reason."""

    async def paused(self, key: str) -> float:
        """Seconds left of a pause under `key` (0 = not paused)."""
        return (await self.paused_why(key))[0]

    async def close(self) -> None:
        return None

    def fresh_connections(self, limit: int | None) -> bool:
        """Must an upstream with this `max_connections` get a new connection per delivery?
        When its slots are shared with other processes an idle pooled connection would be
        open without holding one, so together they could exceed the limit."""
        return self.shared and limit is not None

    def local_share(self, limit: int) -> int:
        """How much of a concurrency `limit` this process can ever hold (all of it: shared
        stores hand slots to whichever process needs them)."""
        return limit


class MemoryStore(Store):
    """One node's limits in its own memory: the default, and the fallback while Redis is
    unreachable. Times are monotonic, so a wall-clock jump changes nothing."""

    def __init__(self, node_id: str = "local") -> None:
        super().__init__(MemoryStorage(), node_id)
        self._leases: dict[str, dict[str, float]] = {}
        self._next: dict[str, float] = {}
        self._pauses: dict[str, tuple[float, str]] = {}

    def _live(self, key: str) -> dict[str, float]:
        now = time.monotonic()
        held = self._leases.setdefault(key, {})
        for token in [t for t, until in held.items() if until <= now]:
            del held[token]
        return held

    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        held = self._live(key)
        if len(held) >= limit:
            return None
        token = self._token()
        held[token] = time.monotonic() + ttl
        return Lease(self, key, token)

    async def unlease(self, lease: Lease) -> None:
        self._leases.get(lease.key, {}).pop(lease.token, None)

    async def renew(self, leases: Sequence[Lease], ttl: float) -> None:
        until = time.monotonic() + ttl
        for lease in leases:
            held = self._leases.get(lease.key, {})
            if lease.token in held:
                held[lease.token] = until

    async def leases(self, key: str) -> int:
        return len(self._live(key))

    async def space(self, key: str, interval: float) -> float:
        now = time.monotonic()
        nxt = self._next.get(key, 0.0)
        if nxt > now:
            return nxt - now
        self._next[key] = now + interval
        return 0.0

    async def pause(self, key: str, seconds: float, reason: str = "") -> None:
        until = time.monotonic() + seconds
        if until > self._pauses.get(key, (0.0, ""))[0]:
            self._pauses[key] = (until, reason)

    async def paused_why(self, key: str) -> tuple[float, str]:
        until, reason = self._pauses.get(key, (0.0, ""))
        left = until - time.monotonic()
        return (left, reason) if left > 0 else (0.0, "")
