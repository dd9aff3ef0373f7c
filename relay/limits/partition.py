"""Limits for one of N worker processes on one machine, with the memory backend.

`relay serve` with `workers: N` runs N processes, each with its own spool shard, scheduler
and deliverer. With the memory backend they share no counters, so each worker enforces its
*part* of every limit: worker i of N gets `amount // N`, plus one for the first
`amount % N` workers. The parts add up to the configured limit exactly, so the machine as a
whole never sends more than the limit allows (concurrency, quotas, rates), whatever way the
kernel spreads connections between the workers.

Two limits cannot be split, so they are shared exactly through small files under the spool
directory, under `flock` (microseconds, and only for the upstreams that need it):
- a minimum interval (two workers each keeping twice the interval can still send two
  messages a moment apart): the next allowed start is a timestamp in a file;
- a `max_connections` smaller than N (a worker with no part could never deliver its own
  shard's mail): each connection slot is a file, a delivery holds one slot's lock (the
  kernel drops it if the worker dies), and such an upstream gets a fresh connection per
  delivery, so an idle pooled connection can never hold a slot that is free on paper.

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
_SLOT = "slot:"  # lease tokens of shared slots (SharedSlots), not MemoryStore leases


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
            fd = os.open(self.directory / f"{_file_name(key)}.next", os.O_RDWR | os.O_CREAT,
                         0o600)
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


class SharedSlots:
    """Concurrency slots shared by the processes of one machine: slot i of `key` is held
    while this process holds the exclusive flock of its file."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fds: dict[tuple[str, int], int] = {}
        self._held: set[tuple[str, int]] = set()  # flock does not exclude our own fd

    def _fd(self, key: str, slot: int) -> int:
        fd = self._fds.get((key, slot))
        if fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / f"{_file_name(key)}.slot{slot}",
                         os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[(key, slot)] = fd
        return fd

    def acquire(self, key: str, limit: int) -> int | None:
        for slot in range(limit):
            if (key, slot) in self._held:
                continue
            try:
                fcntl.flock(self._fd(key, slot), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another worker has it
            self._held.add((key, slot))
            return slot
        return None

    def release(self, key: str, slot: int) -> None:
        if (key, slot) in self._held:
            self._held.discard((key, slot))
            fcntl.flock(self._fd(key, slot), fcntl.LOCK_UN)

    def held(self, key: str) -> int:
        return sum(1 for k, _ in self._held if k == key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)  # releases every lock still held
        self._fds.clear()
        self._held.clear()


def _file_name(key: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:40]
    return f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class PartitionedStore(MemoryStore):
    """A MemoryStore that scales every limit to this worker's part."""

    def __init__(self, partition: Partition, node_id: str = "local") -> None:
        if not 0 <= partition.index < partition.count:
            raise ValueError(f"worker {partition.index} of {partition.count}")
        super().__init__(node_id)
        self.index = partition.index
        self.count = partition.count
        self._spacing = SharedSpacing(partition.directory)
        self._slots = SharedSlots(partition.directory)

    def _shared_slots(self, limit: int) -> bool:
        return limit < self.count

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
        # Shared slots: any worker may hold all of them.
        return limit if self._shared_slots(limit) else part(limit, self.index, self.count)

    def fresh_connections(self, limit: int | None) -> bool:
        return limit is not None and self._shared_slots(limit)

    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        if self._shared_slots(limit):
            slot = self._slots.acquire(key, limit)
            return None if slot is None else Lease(self, key, f"{_SLOT}{slot}")
        return await super().lease(key, part(limit, self.index, self.count), ttl)

    async def unlease(self, lease: Lease) -> None:
        if lease.token.startswith(_SLOT):
            self._slots.release(lease.key, int(lease.token[len(_SLOT):]))
            return
        await super().unlease(lease)

    async def leases(self, key: str) -> int:
        return await super().leases(key) + self._slots.held(key)

    async def space(self, key: str, interval: float) -> float:
        return self._spacing.space(key, interval)

    async def close(self) -> None:
        self._slots.close()
        self._spacing.close()
        await super().close()
