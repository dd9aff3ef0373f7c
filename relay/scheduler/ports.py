"""What the scheduler asks of the stages around it, as protocols (the runtime wires the real
ones): the deliverer, the upstream throttles (`Gate`) and the bounce notifier."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from relay.core.dsn import DsnParams
from relay.core.model import EgressSource, RecipientResult, Reply, Upstream
from relay.core.waits import Wait
from relay.scheduler.entry import Entry


class Deliverer(Protocol):
    async def deliver(
        self,
        upstream: Upstream,
        source: EgressSource,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        dsn: DsnParams | None = None,
        wire: bool = False,
    ) -> list[RecipientResult]: ...


class Gate(Protocol):
    """Upstream throttles (relay.limits.gate). `acquire` returns None when a delivery may
    start now (and counts it), else a `Wait` (how long, and why); `release` ends a started
    delivery. `slow_down` is the pause after a rate-limit reply or no answer (growing while
    they repeat; `reason` is shown while it lasts); `recovered` tells it a delivery went
    through."""

    async def acquire(self, upstream: Upstream) -> Wait | None: ...
    async def release(self, upstream: Upstream) -> None: ...
    def slow_down(self, upstream: Upstream, reason: str = "") -> float: ...
    def recovered(self, upstream: Upstream) -> None: ...
    def local_cap(self, limit: int) -> int:
        """This process's part of a concurrency limit (a worker of several: less)."""
        ...


class NoGate:
    """No throttles beyond the concurrency cap (used when nothing else is configured)."""

    async def acquire(self, upstream: Upstream) -> Wait | None:
        return None

    def local_cap(self, limit: int) -> int:
        return limit

    async def release(self, upstream: Upstream) -> None:
        return None

    def slow_down(self, upstream: Upstream, reason: str = "") -> float:
        return 30.0

    def recovered(self, upstream: Upstream) -> None:
        return None


class BounceNotifier(Protocol):
    """Told of recipients that bounced or expired (relay.bounce.notifier.Bouncer): queues a
    DSN to the sender when one is due and returns its entry for the scheduler to enqueue."""

    async def bounced(
        self,
        e: Entry,
        failed: list[tuple[str, str, Reply]],
        data: bytes | None,
        *,
        reporting_mta: str,
    ) -> Entry | None: ...
