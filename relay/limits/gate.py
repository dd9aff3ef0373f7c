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

Every "not yet" is a `Wait` (relay/core/waits.py): how long, what kind, and a sentence
naming the limit and when it opens, which the scheduler keeps on the upstream's queue so
`relay queue show` can say why mail waits. Only "every connection is busy" leaves the rest
of the queue to the deliveries that hold the connections (`whole_queue=False`).

With the memory backend (relay/limits/machine.py) connection slots follow open connections,
pooled ones included: after a delivery, and every BALANCE_EVERY while idle connections hold
slots, a worker holding more than its fair share while others wait closes idle connections
(`trim`, wired to the deliverer) and gives their slots back.

`floor` makes `min_interval` a floor as the receiver sees it: the deliverer calls it just
before it sends MAIL, and it waits until `min_interval` (plus a small margin for jitter)
has passed since the previous MAIL to that upstream from any process.

Slow-down: an upstream that answers with a rate-limit reply (421, 451 4.7.x, the SendGrid
and Mailjet throttling texts; relay.delivery.outcome) pauses for `slow_down_initial`, then
twice as long each time it does it again right after a pause, up to `slow_down_max`; one
delivered message resets it. Replies from deliveries that started before the pause do not
escalate it. The pause is shared: with the memory backend every worker of this machine sees
it, and it outlives a restart (relay/limits/machine.py); with Redis every node's queue for
that upstream waits. The doubling itself is counted per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from relay.core.model import Upstream
from relay.core.waits import (
    CONNECTIONS,
    INTERVAL,
    LIMITS_BACKEND,
    QUOTA,
    SLOW_DOWN,
    Wait,
    clock_time,
)
from relay.events import Metrics
from relay.limits.failover import BACKEND_ERRORS, BackendUnavailable
from relay.limits.machine import BALANCE_EVERY, MachineStore
from relay.limits.store import Lease, Store, Window, span

WARN_EVERY = 60.0  # seconds between two identical backend warnings
log = logging.getLogger("relay.limits")

LEASE_POLL = 0.25  # all slots taken (maybe on another node): look again this soon
_FLOOR_ERRORS: tuple[type[BaseException], ...] = (*BACKEND_ERRORS, BackendUnavailable)
CONN_POLL = 0.02  # every connection held by this machine's workers: ask again this soon
FLOOR_TRIES = 200  # `floor` waits at most this many turns (each one interval or less)


def floor_margin(interval: float) -> float:
    """Added to min_interval between two MAIL commands, so the receiver's own clock, network
    and scheduling, which can delay one arrival more than the next, never show a gap below
    the interval: 3% of it, at least 10 ms, at most 50 ms. (It was 1%, at least 3 ms, until
    a loaded CI machine's receiver, on loopback, saw 0.2995 s for a 0.3 s interval.)"""
    return min(0.05, max(0.01, interval * 0.03))


def quota_name(w: Window) -> str:
    return {3600: "hourly", 86400: "daily"}.get(w.seconds, f"per {span(w.seconds)}")


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
        self._balancer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._warned: dict[str, float] = {}  # warning text -> when it may be logged again
        self._upstreams: dict[str, Upstream] = {}
        # Closes idle pooled connections of an upstream beyond a number (the deliverer's
        # `trim`, wired by the runtime); None: nothing pooled to close.
        self.trim: Callable[[Upstream, int], Awaitable[None]] | None = None

    # -- the scheduler's Gate protocol ---------------------------------------------------
    def local_cap(self, limit: int) -> int:
        return self.store.local_share(limit)

    async def acquire(self, upstream: Upstream) -> Wait | None:
        """None: the delivery may start now (and is counted); else why and how long not."""
        try:
            return await self._acquire(upstream)
        except BackendUnavailable as exc:
            return Wait(exc.retry_in, LIMITS_BACKEND,
                        "limits backend unreachable (on_backend_failure: tempfail), "
                        f"trying again at {clock_time(time.time() + exc.retry_in)}")
        except BACKEND_ERRORS as exc:  # a plain store outside Failover: wait, never drop
            self._warn(f"limits backend error for upstream {upstream.id}: {exc}; its mail waits")
            return Wait(5.0, LIMITS_BACKEND, f"limits backend error: {exc}")

    async def _acquire(self, upstream: Upstream) -> Wait | None:
        t = upstream.throttle
        key = upstream.id
        try:
            paused, why = await self.store.paused_why(key)
        except BackendUnavailable:
            paused = 0.0  # advisory: this node's own pause still holds (the scheduler's)
        if paused > 0:
            until = clock_time(time.time() + paused)
            return Wait(paused, SLOW_DOWN, f"upstream paused until {until} ({why or 'slow-down'})")
        quotas = quota_windows(upstream)
        lease: Lease | None = None
        if t.max_connections:
            lease = await self.store.lease(key, t.max_connections, self.lease_ttl)
            if lease is None:
                local = isinstance(self.store, MachineStore)
                return Wait(
                    CONN_POLL if local else LEASE_POLL, CONNECTIONS,
                    f"waiting for a connection to {key}: all {t.max_connections} in use",
                    whole_queue=not local,
                )
            self._upstreams[key] = upstream
        try:
            if t.min_interval > 0:
                wait = await self.store.space(key, t.min_interval)
                if wait > 0:
                    raise _NotYet(Wait(
                        wait, INTERVAL, f"min_interval {t.min_interval:g}s on {key}: next start "
                        f"at {clock_time(time.time() + wait)}"))
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
                    raise _NotYet(Wait(
                        wait, QUOTA,
                        f"waiting for quota {quota_name(window)} {window.amount}/{window.amount}"
                        f" on {key}, window opens {clock_time(time.time() + wait)}"))
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
        return None

    async def floor(self, upstream: Upstream) -> None:
        """Just before MAIL: wait until min_interval has passed since the last MAIL sent to
        this upstream by any process (the receiver's view of the interval)."""
        interval = upstream.throttle.min_interval
        if interval <= 0:
            return
        gap = interval + floor_margin(interval)
        for _ in range(FLOOR_TRIES):
            try:
                wait = await self.store.space(upstream.id + "#sent", gap)
            except _FLOOR_ERRORS:
                return  # the gate's own spacing still held at acquire
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def release(self, upstream: Upstream) -> None:
        held = self._held.get(upstream.id)
        if held:
            lease = held.pop()
            with contextlib.suppress(*BACKEND_ERRORS):
                await self.store.unlease(lease)
        if isinstance(self.store, MachineStore):
            try:
                await self._balance(upstream.id, force=False)
            except BACKEND_ERRORS as exc:  # the next release or balancing round tries again
                self._warn(f"giving back connection slots of {upstream.id} failed: {exc}")

    async def _balance(self, key: str, *, force: bool) -> None:
        """Give idle connection slots back to workers that wait for them (machine store)."""
        store = self.store
        if not isinstance(store, MachineStore):
            return
        n = store.take_surplus(key, force=force)
        if n <= 0:
            return
        upstream = self._upstreams.get(key)
        try:
            if upstream is not None and self.trim is not None:
                held, busy = store.holding(key)
                await self.trim(upstream, held - busy)
        finally:
            store.give_back(key)

    def slow_down(self, upstream: Upstream, reason: str = "") -> float:
        now = self.clock()
        b = self._backoff.setdefault(upstream.id, _Backoff())
        if now < b.until:
            return b.until - now  # the same episode: deliveries started before the pause
        b.level += 1
        pause = min(self.slow_down_max, self.slow_down_initial * 2.0 ** (b.level - 1))
        b.until = now + pause
        self.metrics.limit_hits.labels("slow_down").inc()
        self._background(self._share_pause(upstream.id, pause, reason))
        return pause

    def recovered(self, upstream: Upstream) -> None:
        b = self._backoff.get(upstream.id)
        if b is not None and b.level and self.clock() >= b.until:
            b.level = 0

    # -- lifecycle -------------------------------------------------------------------------
    async def close(self) -> None:
        for task in (self._renewer, self._balancer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._renewer = self._balancer = None
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
    def _warn(self, text: str) -> None:
        """A backend problem (a full disk, an unreachable server) is one line, at most once
        a minute per text: it repeats on every delivery and every balancing round."""
        now = time.monotonic()
        if now >= self._warned.get(text, 0.0):
            self._warned[text] = now + WARN_EVERY
            if len(self._warned) > 1000:
                self._warned = {k: v for k, v in self._warned.items() if v > now}
            log.warning("%s", text)

    async def _share_pause(self, key: str, seconds: float, reason: str) -> None:
        try:
            await self.store.pause(key, seconds, reason)
        except BackendUnavailable:
            pass
        except BACKEND_ERRORS as exc:  # this process's own pause still holds
            self._warn(f"could not share the pause of {key} with the other workers: {exc}")

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ensure_renewer(self) -> None:
        if isinstance(self.store, MachineStore):
            if self._balancer is None or self._balancer.done():
                self._balancer = asyncio.get_running_loop().create_task(
                    self._balance_loop(), name="limits-connection-balance"
                )
            return  # holdings live as long as the process: nothing to renew
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_loop(), name="limits-lease-renewal"
            )

    async def _balance_loop(self) -> None:
        """Idle connections holding slots that another worker waits for are closed."""
        assert isinstance(self.store, MachineStore)
        while True:
            await asyncio.sleep(BALANCE_EVERY)
            for key in self.store.idle_holdings():
                try:
                    await self._balance(key, force=True)
                except BACKEND_ERRORS as exc:  # e.g. the disk is full: said once a minute
                    self._warn(f"giving back connection slots of {key} failed: {exc}")
                except Exception:  # never let the balancer die: the next round tries again
                    log.exception("giving back connection slots of %s failed", key)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            leases = [lease for held in self._held.values() for lease in held]
            if leases:
                with contextlib.suppress(BackendUnavailable, *BACKEND_ERRORS):
                    await self.store.renew(leases, self.lease_ttl)


class _NotYet(Exception):
    def __init__(self, wait: Wait) -> None:
        self.wait = wait
