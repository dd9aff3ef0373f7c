"""Intake limits (the `IntakeLimiter` of relay.intake): how much mail a client, organisation,
account or sender may hand the relay, checked before anything is written to the spool.

Over a limit the transaction gets `451 4.7.1 <which limit> exceeded, try again in N s` and
nothing is accepted; the platform retries later. Per-minute/hour/day limits are sliding-window
counters (the `limits` library), shared through Redis when the backend is Redis. Concurrent
connections are counted per client IP address on this node (the listener asks at connect,
before any AUTH, and a load balancer spreads one client's connections across nodes anyway).
"""

from __future__ import annotations

import logging
import math
from collections import Counter

from relay.core.errors import RateLimited
from relay.events import Metrics
from relay.limits.failover import BACKEND_ERRORS, BackendUnavailable
from relay.limits.store import Store, Window
from relay.policy import AppliedLimit

log = logging.getLogger("relay.limits")

SPANS = (("per_minute", 60), ("per_hour", 3600), ("per_day", 86400))


def intake_windows(limits: list[AppliedLimit]) -> list[Window]:
    out = []
    for lim in limits:
        for field, seconds in SPANS:
            n = getattr(lim, field)
            if n is not None:
                out.append(
                    Window(f"{lim.scope} {lim.key}", n, seconds, ("intake", lim.scope, lim.key))
                )
    return out


def _scope(w: Window) -> str:
    return w.ident[1]


class IntakeRateLimiter:
    def __init__(self, store: Store, metrics: Metrics, *, max_connections: int | None) -> None:
        self.store = store
        self.metrics = metrics
        self.max_connections = max_connections
        self._connections: Counter[str] = Counter()

    async def check_message(self, limits: list[AppliedLimit], recipients: int) -> None:
        for lim in limits:
            cap = lim.recipients_per_message
            if cap is not None and recipients > cap:
                self.metrics.limit_hits.labels(lim.scope).inc()
                raise RateLimited(
                    f"{lim.scope} {lim.key}: {cap} recipients per message exceeded"
                    f" ({recipients} given); send the rest in another message",
                    reason=f"limit {lim.scope} recipients_per_message",
                )
        windows = intake_windows(limits)
        if not windows:
            return
        try:
            denied = await self.store.consume(windows, fixed=False)
        except BackendUnavailable as exc:
            self.metrics.limit_hits.labels("backend").inc()
            raise RateLimited(
                f"rate limits temporarily unavailable, try again in {math.ceil(exc.retry_in)} s",
                reason="limits backend unavailable",
            ) from exc
        except BACKEND_ERRORS as exc:
            log.exception("limits backend error at intake")
            raise RateLimited(reason="limits backend error") from exc
        if denied is None:
            return
        window, wait = denied
        self.metrics.limit_hits.labels(_scope(window)).inc()
        raise RateLimited(
            f"{window.label}: {window.describe()} exceeded, try again in {math.ceil(wait)} s",
            reason=f"limit {window.label} {window.amount}/{window.seconds}s",
        )

    def connection_opened(self, client: str) -> None:
        """Count a new connection from `client`, or refuse it (the listener answers 421)."""
        cap = self.max_connections
        if cap is not None and self._connections[client] >= cap:
            self.metrics.limit_hits.labels("client").inc()
            raise RateLimited(
                f"client {client}: {cap} concurrent connections exceeded,"
                " try again when one of them has closed",
                reason="limit client max_connections",
            )
        self._connections[client] += 1

    def connection_closed(self, client: str) -> None:
        self._connections[client] -= 1
        if self._connections[client] <= 0:
            del self._connections[client]

    def connections(self) -> dict[str, int]:
        return dict(self._connections)
