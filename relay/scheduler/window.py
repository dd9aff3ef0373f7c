"""The bounded in-memory window over the spool (like Postfix's active queue limit).

At most `max_entries` queued messages are held in memory as entries; the rest wait only in
the spool and are found through its (held, due, queue_id) index. `cursor` is the spool-side
mark: every deliverable message whose (due, queue_id) is below it is in memory (or was set
aside for a paused upstream, `held_back`, until that pause ends); above it, maybe not. New
mail goes straight into memory while there is room; a refill reads the spool in due order
when room frees or the spool holds mail due before what memory holds, making room by setting
aside held messages, those waiting for a later retry, and the tail of a paused upstream's
queue.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable

from relay.scheduler.entry import ACTIVE, READY, WAITING, Entry, SpoolKey, key_after
from relay.scheduler.queues import UpstreamQueue
from relay.spool import Spool

log = logging.getLogger("relay.scheduler")


class ActiveWindow:
    """Which queued messages are in memory, and where the spool's unread part begins.

    `admit` puts an entry read from the spool into the scheduler (timer heap or ready
    queue); `wake` tells the scheduler's timer loop to look again."""

    def __init__(
        self,
        spool: Spool,
        queues: dict[str, UpstreamQueue],
        *,
        max_entries: int,
        clock: Callable[[], float],
        admit: Callable[[Entry], None],
        wake: Callable[[], None],
    ) -> None:
        self.spool = spool
        self.queues = queues
        self.max_entries = max_entries
        self.clock = clock
        self._admit = admit
        self._wake = wake
        self.entries: dict[str, Entry] = {}
        self.cursor: SpoolKey | None = None  # None: every queued message is in memory
        # paused upstream -> the lowest key of its messages set aside until the pause ends
        self.held_back: dict[str, SpoolKey] = {}
        self.pinned: set[str] = set()  # rescheduled later than the spool knows: never set aside
        self._refill_task: asyncio.Task[None] | None = None
        self._low: SpoolKey | None = None  # lowest key set aside during a refill
        self._skip: set[str] = set()  # ids that left memory during a refill: not re-admitted
        self._refill_not_before = 0.0  # for a refill that must first make room
        self._error_until = 0.0
        self._no_victims_until = 0.0

    @property
    def batch(self) -> int:
        return max(1, self.max_entries // 4)

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.max_entries

    async def load_first(self, push: Callable[[Entry], None]) -> int:
        """At start: the first `max_entries` deliverable messages in due order, each handed
        to `push` (the timer heap); the rest are read by refills. Returns how many."""
        batch = await self.spool.due(None, self.max_entries)
        n = 0
        for due, m in batch.messages:
            e = Entry.from_spool(m, due)
            if e.pending and e.queue_id not in self.entries:
                self.entries[e.queue_id] = e
                push(e)
                n += 1
        if not batch.exhausted and batch.last is not None:
            self.cursor = key_after(batch.last)
        return n

    def drop(self, queue_id: str) -> Entry | None:
        """Take a message out of memory (finished, deleted or set aside)."""
        e = self.entries.pop(queue_id, None)
        if e is not None:
            self.pinned.discard(queue_id)
            if self._refill_task is not None:
                self._skip.add(queue_id)
            elif self.cursor is not None and len(self.entries) <= self.max_entries - self.batch:
                self._wake()  # room for a refill
        return e

    def lower_cursor(self, key: SpoolKey) -> None:
        if self.cursor is None or key < self.cursor:
            self.cursor = key
        if self._refill_task is not None and (self._low is None or key < self._low):
            self._low = key

    def set_aside(self, e: Entry, now: float) -> None:
        """Leave a message to the spool only (not in memory, or just dropped): a later
        refill finds it by its key, or, for a paused upstream, once the pause ends."""
        uq = self.queues.get(e.upstream)
        if uq is not None and uq.paused_until > now:
            low = self.held_back.get(e.upstream)
            if low is None or e.key < low:
                self.held_back[e.upstream] = e.key
        else:
            self.lower_cursor(e.key)
        self.spool.drop_cached_body(e.queue_id)
        self._wake()

    def room_for(self, e: Entry) -> bool:
        """Memory is full: make room for `e` (a message just made durable) if anything in
        memory is less urgent."""
        now = self.clock()
        if now < self._no_victims_until:
            return False
        if self.make_room(self.batch, now, keep=e.upstream) == 0:
            self._no_victims_until = now + 1.0  # no full scan per message while nothing frees
            return False
        return True

    def make_room(self, n: int, now: float, keep: str | None = None) -> int:
        """Set aside up to n entries, least urgent first: held ones, then those waiting for a
        later retry (latest first), then the tail of paused upstreams' ready queues (other
        than `keep`'s). Returns how many left memory."""
        held: list[Entry] = []
        waiting: list[Entry] = []
        for e in self.entries.values():
            if e.held:
                if e.state != ACTIVE:
                    held.append(e)
            elif e.state == WAITING and e.next_attempt > now and e.queue_id not in self.pinned:
                waiting.append(e)
        victims = held[:n]
        if len(victims) < n:
            victims += heapq.nlargest(n - len(victims), waiting, key=lambda x: x.next_attempt)
        for e in victims:
            self.drop(e.queue_id)
            self.lower_cursor(e.key)  # held: in case the spool missed the hold
            self.spool.drop_cached_body(e.queue_id)
        freed = len(victims)
        for uq in self.queues.values():
            if freed >= n:
                break
            if uq.upstream_id == keep or uq.paused_until <= now:
                continue
            while freed < n and (tail := uq.pop_tail()) is not None:
                if self.entries.get(tail.queue_id) is not tail or tail.state != READY:
                    continue
                self.drop(tail.queue_id)
                self.set_aside(tail, now)
                freed += 1
        return freed

    def _restore_held_back(self, now: float) -> None:
        """Messages set aside for a paused upstream become findable when the pause ends."""
        for up, key in list(self.held_back.items()):
            uq = self.queues.get(up)
            if uq is None or uq.paused_until <= now:
                del self.held_back[up]
                self.lower_cursor(key)

    def maybe_refill(self, now: float) -> None:
        """Start a refill in the background when room freed or the spool holds mail due now."""
        if self._refill_task is not None:
            return
        if self.held_back:
            self._restore_held_back(now)
        if self.cursor is None:
            return
        if now < self._error_until:
            return
        if self.max_entries - len(self.entries) >= self.batch or (
            self.cursor[0] <= now and now >= self._refill_not_before
        ):
            self._refill_task = asyncio.create_task(self._refill(), name="scheduler-refill")

            def done(_: asyncio.Task[None]) -> None:
                self._refill_task = None
                self._wake()

            self._refill_task.add_done_callback(done)

    def next_check(self, now: float) -> float:
        """Seconds until the window wants `maybe_refill` called again (inf: never by time)."""
        timeout = float("inf")
        if self.cursor is not None and self._refill_task is None:
            when = max(self.cursor[0], self._refill_not_before, self._error_until)
            timeout = when - now
        for up in self.held_back:
            uq = self.queues.get(up)
            timeout = min(timeout, (uq.paused_until - now) if uq else 0.0)
        return timeout

    async def _refill(self) -> None:
        """Read the next messages in due order from the spool into memory. When the spool
        holds mail already due and memory is full, less urgent entries are set aside first."""
        self._low = None
        self._skip = set()
        now = self.clock()
        cursor = self.cursor
        assert cursor is not None
        room = self.max_entries - len(self.entries)
        room_freed = room >= self.batch
        if not room_freed:  # the spool holds mail due now: less urgent entries make room
            room += self.make_room(self.batch - room, now)
        admitted = 0
        failed = False
        next_cursor: SpoolKey | None = cursor
        try:
            if room > 0:
                # Read past the room: rows for a paused upstream are set aside, not loaded.
                batch = await self.spool.due(cursor, max(room, self.batch))
                now = self.clock()
                next_cursor = None if batch.exhausted or batch.last is None else key_after(batch.last)
                for due, m in batch.messages:
                    if m.queue_id in self.entries or m.queue_id in self._skip:
                        continue
                    e = Entry.from_spool(m, due)
                    if not e.pending:
                        continue
                    uq = self.queues.get(e.upstream)
                    if uq is not None and uq.paused_until > now:
                        self.set_aside(e, now)
                        continue
                    if len(self.entries) >= self.max_entries:
                        next_cursor = e.key  # the first that did not fit: read again later
                        break
                    self._admit(e)
                    admitted += 1
        except Exception:
            log.exception("reading queued messages from the spool failed; trying again in 1s")
            failed = True
        finally:
            low = self._low
            self._low = None
            self._skip = set()
            if next_cursor is None or (low is not None and low < next_cursor):
                next_cursor = low
            self.cursor = next_cursor
            # A refill that found nothing to load (all set aside, no room) waits a second.
            if failed:
                self._error_until = self.clock() + 1.0
            elif not room_freed and admitted == 0:
                # Memory full of mail as urgent as the spool's: look again in a second (or
                # as soon as deliveries free a batch of room).
                self._refill_not_before = self.clock() + 1.0

    def operator_due(self, queue_id: str, when: float) -> None:
        """An operator made a message that is not in memory due at `when` (retry, release):
        the spool already says so; the next refill loads it."""
        self.lower_cursor((when, queue_id))
        self._refill_not_before = 0.0
        self._wake()
