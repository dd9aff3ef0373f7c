"""Limits for one of N worker processes on one machine, with the memory backend.

`relay serve` with `workers: N` runs N processes, each with its own spool shard, scheduler
and deliverer. With the memory backend they share no counters, so each worker enforces its
*part* of every limit: worker i of N gets `amount // N`, plus one for the first
`amount % N` workers. The parts add up to the configured limit exactly, so the machine as a
whole never sends more than the limit allows (concurrency, quotas, rates), whatever way the
kernel spreads connections between the workers. Two approximations remain, and `relay
check` warns about them: a limit smaller than N still gives every worker one (a worker
with none could never deliver its own shard's mail), and a minimum interval becomes N times
the interval per worker (the average spacing holds, not the spacing of every pair). The
Redis backend shares exact counters instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from relay.limits.store import Lease, MemoryStore, Window


def part(amount: int, index: int, count: int) -> int:
    """Worker `index`'s part of `amount` split over `count` workers (at least 1)."""
    return max(1, amount // count + (1 if index < amount % count else 0))


class PartitionedStore(MemoryStore):
    """A MemoryStore that scales every limit to this worker's part."""

    def __init__(self, index: int, count: int, node_id: str = "local") -> None:
        if not 0 <= index < count:
            raise ValueError(f"worker {index} of {count}")
        super().__init__(node_id)
        self.index = index
        self.count = count

    def _scaled(self, w: Window) -> Window:
        return replace(w, amount=part(w.amount, self.index, self.count))

    async def consume(
        self, windows: Sequence[Window], *, fixed: bool
    ) -> tuple[Window, float] | None:
        full = await super().consume([self._scaled(w) for w in windows], fixed=fixed)
        if full is None:
            return None
        # Report the configured window (people read "100 messages per hour", not our part).
        window, wait = full
        original = next((w for w in windows if w.ident == window.ident), window)
        return original, wait

    async def used(self, w: Window, *, fixed: bool) -> int:
        return await super().used(self._scaled(w), fixed=fixed)

    def local_share(self, limit: int) -> int:
        return part(limit, self.index, self.count)

    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        return await super().lease(key, part(limit, self.index, self.count), ttl)

    async def space(self, key: str, interval: float) -> float:
        return await super().space(key, interval * self.count)
