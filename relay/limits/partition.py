"""Limits for one of N worker processes on one machine, with the memory backend.

`relay serve` with `workers: N` runs N processes, each with its own spool shard, scheduler
and deliverer. With the memory backend they share no counters, so each worker enforces its
*part* of every limit: worker i of N gets `amount // N`, plus one for the first
`amount % N` workers. The parts add up to the configured limit exactly, so the machine as a
whole never sends more than the limit allows (concurrency, quotas, rates), whatever way the
kernel spreads connections between the workers. One approximation remains, and `relay
check` warns about it: a `max_connections` smaller than N still gives every worker one (a
worker with none could never deliver its own shard's mail).

A minimum interval cannot be split (two workers each keeping twice the interval can still
send two messages a moment apart), so it is shared exactly instead: the next allowed start
of each upstream is a timestamp in a small file under the spool directory, read and
advanced under `flock` (microseconds, and only for upstreams that have an interval).

The Redis backend shares exact counters for everything instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from relay.limits.store import Lease, MemoryStore, Window

_STAMP = struct.Struct("=d")


@dataclass(frozen=True)
class Partition:
    index: int  # this worker
    count: int  # of this many
    directory: Path  # where workers share what cannot be split (minimum intervals)


def part(amount: int, index: int, count: int) -> int:
    """Worker `index`'s part of `amount` split over `count` workers (at least 1)."""
    return max(1, amount // count + (1 if index < amount % count else 0))


class SharedSpacing:
    """Minimum intervals shared by the processes of one machine through locked files.

    CLOCK_MONOTONIC is one clock for every process of a boot; a stamp further ahead than
    the interval itself is from an earlier boot and is ignored."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fds: dict[str, int] = {}

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:40]
            digest = hashlib.sha256(key.encode()).hexdigest()[:12]
            fd = os.open(self.directory / f"{safe}-{digest}.next", os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[key] = fd
        return fd

    def space(self, key: str, interval: float) -> float:
        fd = self._fd(key)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _STAMP.size, 0)
            nxt = _STAMP.unpack(raw)[0] if len(raw) == _STAMP.size else 0.0
            now = time.monotonic()
            if now < nxt <= now + interval:
                return nxt - now
            os.pwrite(fd, _STAMP.pack(now + interval), 0)
            return 0.0
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PartitionedStore(MemoryStore):
    """A MemoryStore that scales every limit to this worker's part."""

    def __init__(self, partition: Partition, node_id: str = "local") -> None:
        if not 0 <= partition.index < partition.count:
            raise ValueError(f"worker {partition.index} of {partition.count}")
        super().__init__(node_id)
        self.index = partition.index
        self.count = partition.count
        self._spacing = SharedSpacing(partition.directory)

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
        return self._spacing.space(key, interval)

    async def close(self) -> None:
        self._spacing.close()
        await super().close()
