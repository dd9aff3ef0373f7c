"""Scheduler: decides when each queued message is tried, on which upstream, and how many at once.

Waiting messages sit in one timer heap; due messages are routed by the *current* policy and
join their upstream's ready queue, which is fair between organisations (round robin over
per-organisation queues) so one organisation's campaign cannot starve another's receipts.
Each upstream has at most `max_connections` deliveries in flight; the `Gate` (relay.limits)
decides when the next may start (minimum interval, hourly/daily quotas, shared leases) and an
upstream that answers "slow down" pauses as a whole. Outcomes are written back to the spool;
bounced and expired recipients produce one DSN. Nothing here ever drops a message: every
path ends in the spool as delivered, bounced, expired or still pending.

Memory is bounded (`spool.active_messages`, like Postfix's active queue limit): at most that
many queued messages are held here as entries; the rest wait only in the spool and are found
through its (held, due, queue_id) index. `_cursor` is the spool-side mark: every deliverable
message whose (due, queue_id) is below it is in memory (or was set aside for a paused
upstream, `_held_back`, until that pause ends); above it, maybe not. New mail goes straight
into memory while there is room; a refill reads the spool in due order when room frees or
the spool holds mail due before what memory holds, making room by setting aside held
messages, those waiting for a later retry, and the tail of a paused upstream's queue.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from relay.bounce.dsn import build_dsn, should_send_dsn
from relay.config.model import Config
from relay.core.message import header_end
from relay.core.model import (
    Disposition,
    EgressPool,
    EgressSource,
    Outcome,
    RecipientResult,
    Reply,
    Upstream,
)
from relay.events import MailLog
from relay.policy import Attribution, route
from relay.scheduler.retry import RetryPolicy
from relay.spool import RcptStatus, RecipientUpdate, Spool, SpoolMessage

log = logging.getLogger("relay.scheduler")


class Deliverer(Protocol):
    async def deliver(
        self,
        upstream: Upstream,
        source: EgressSource,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
    ) -> list[RecipientResult]: ...


class Gate(Protocol):
    """Upstream throttles (relay.limits.gate). `acquire` returns 0 when a delivery may start
    now (and counts it), else the seconds to wait; `release` ends a started delivery.
    `slow_down` is the pause after a rate-limit reply (growing while they repeat);
    `recovered` tells it a delivery went through."""

    async def acquire(self, upstream: Upstream) -> float: ...
    async def release(self, upstream: Upstream) -> None: ...
    def slow_down(self, upstream: Upstream) -> float: ...
    def recovered(self, upstream: Upstream) -> None: ...
    def local_cap(self, limit: int) -> int:
        """This process's part of a concurrency limit (a worker of several: less)."""
        ...


class NoGate:
    """No throttles beyond the concurrency cap (used when nothing else is configured)."""

    async def acquire(self, upstream: Upstream) -> float:
        return 0.0

    def local_cap(self, limit: int) -> int:
        return limit

    async def release(self, upstream: Upstream) -> None:
        return None

    def slow_down(self, upstream: Upstream) -> float:
        return 30.0

    def recovered(self, upstream: Upstream) -> None:
        return None


WAITING, READY, ACTIVE = 0, 1, 2
_FINAL_EVENT = {
    RcptStatus.DELIVERED: Disposition.DELIVERED,
    RcptStatus.BOUNCED: Disposition.BOUNCED,
    RcptStatus.EXPIRED: Disposition.EXPIRED,
}


@dataclass(slots=True)
class Entry:
    """A queued message as the scheduler sees it (no body: that stays in the spool)."""

    queue_id: str
    sender: str
    org: str
    account: str
    received_at: float
    is_dsn: bool
    held: bool
    pending: dict[str, int]  # recipient -> failed attempts so far
    next_attempt: float = 0.0
    upstream: str = ""
    state: int = WAITING

    def __post_init__(self) -> None:
        # One Entry per queued message stays in memory (200,000 queued ≈ 200,000 entries):
        # share the few distinct organisation/upstream names, and the account when it is
        # the sender (the usual case), instead of a string object per message.
        self.org = sys.intern(self.org)
        self.upstream = sys.intern(self.upstream)
        if self.account == self.sender:
            self.account = self.sender

    @property
    def key(self) -> tuple[float, str]:
        """Its place in the spool's due order (a lower bound of the spool's own key)."""
        return (self.next_attempt, self.queue_id)

    @classmethod
    def from_spool(cls, m: SpoolMessage, due: float | None = None) -> Entry:
        pend = [r for r in m.recipients if r.status is RcptStatus.PENDING]
        return cls(
            m.queue_id,
            m.sender,
            m.org,
            m.account,
            m.received_at,
            m.is_dsn,
            m.held,
            {r.rcpt: r.attempts for r in pend},
            min((r.next_attempt for r in pend), default=0.0) if due is None else due,
            m.upstream,
        )


@dataclass
class UpstreamQueue:
    """The ready queue of one upstream: one FIFO per organisation, served round robin."""

    upstream_id: str
    by_org: dict[str, deque[Entry]] = field(default_factory=dict)
    turn: deque[str] = field(default_factory=deque)
    active: int = 0
    size: int = 0
    paused_until: float = 0.0
    waking: bool = False

    def push(self, e: Entry) -> None:
        q = self.by_org.get(e.org)
        if q is None:
            q = self.by_org[e.org] = deque()
            self.turn.append(e.org)
        q.append(e)
        self.size += 1

    def pop(self) -> Entry | None:
        while self.turn:
            org = self.turn.popleft()
            q = self.by_org[org]
            e = q.popleft()
            self.size -= 1
            if q:
                self.turn.append(org)
            else:
                del self.by_org[org]
            return e
        return None

    def pop_tail(self) -> Entry | None:
        """The newest entry of the organisation with the longest line (set aside first when
        memory is needed: it would be served last, and it keeps the others' turns)."""
        if not self.by_org:
            return None
        org = max(self.by_org, key=lambda o: len(self.by_org[o]))
        q = self.by_org[org]
        e = q.pop()
        self.size -= 1
        if not q:
            del self.by_org[org]
            self.turn.remove(org)
        return e

    def unpop(self, e: Entry) -> None:
        """Put back at the head (a throttle said not yet). The organisation gets its turn
        back too: `pop` sent it to the end of the line, and if it stayed there, a throttle
        that opens once per pop would only ever let the *other* organisation through."""
        q = self.by_org.get(e.org)
        if q is None:
            q = self.by_org[e.org] = deque()
        else:
            self.turn.remove(e.org)
        self.turn.appendleft(e.org)
        q.appendleft(e)
        self.size += 1


class Scheduler:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        deliverer: Deliverer,
        events: MailLog,
        *,
        gate: Gate | None = None,
        default_concurrency: int = 20,
        clock: Callable[[], float] = time.time,
        rand: random.Random | None = None,
        max_entries: int | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.deliverer = deliverer
        self.events = events
        self.gate: Gate = gate or NoGate()
        self.default_concurrency = default_concurrency
        self.clock = clock
        self.rand = rand or random.Random()
        self.entries: dict[str, Entry] = {}
        self.queues: dict[str, UpstreamQueue] = {}
        self._timers: list[tuple[float, str]] = []  # (next_attempt, queue_id); stale ones skipped
        self._fixed_cap = max_entries
        self.max_entries = max_entries or config.relay.spool.active_messages
        self._cursor: tuple[float, str] | None = None  # None: every queued message is in memory
        # paused upstream -> the lowest key of its messages set aside until the pause ends
        self._held_back: dict[str, tuple[float, str]] = {}
        self._refill_task: asyncio.Task[None] | None = None
        self._low: tuple[float, str] | None = None  # lowest key set aside during a refill
        self._skip: set[str] = set()  # ids that left memory during a refill: not re-admitted
        self._pinned: set[str] = set()  # rescheduled later than the spool knows: never set aside
        self._refill_not_before = 0.0  # for a refill that must first make room
        self._error_until = 0.0
        self._no_victims_until = 0.0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._loop_task: asyncio.Task[None] | None = None
        self._rr: dict[str, int] = {}
        self.retry = self._retry_policy(config)

    @staticmethod
    def _retry_policy(config: Config) -> RetryPolicy:
        r = config.relay.retry
        return RetryPolicy(tuple(r.schedule), r.jitter, r.max_age)

    @property
    def _batch(self) -> int:
        return max(1, self.max_entries // 4)

    # -- lifecycle ---------------------------------------------------------------------
    async def recover(self) -> int:
        """Load the first `max_entries` deliverable messages in due order at start (before
        `start`); the rest are read by refills. Returns how many were loaded."""
        batch = await self.spool.due(None, self.max_entries)
        n = 0
        for due, m in batch.messages:
            e = Entry.from_spool(m, due)
            if e.pending and e.queue_id not in self.entries:
                self.entries[e.queue_id] = e
                self._push_timer(e)
                n += 1
        if not batch.exhausted and batch.last is not None:
            self._cursor = _after(batch.last)
        return n

    def start(self) -> None:
        self._running = True
        self._loop_task = asyncio.create_task(self._timer_loop(), name="scheduler-timers")
        for uq in self.queues.values():  # mail enqueued before start waits in ready queues
            self._spawn(uq)

    async def stop(self, grace: float = 30.0) -> None:
        """Stop starting deliveries; give those in flight `grace` seconds, then cancel them
        (a cancelled delivery was not recorded, so it is simply tried again after restart)."""
        self._running = False
        self._wake.set()
        if self._loop_task:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def reconfigure(self, config: Config) -> None:
        """New policy: queued mail is routed by it at its next attempt."""
        self.config = config
        self.retry = self._retry_policy(config)
        self.max_entries = self._fixed_cap or config.relay.spool.active_messages

    # -- intake ------------------------------------------------------------------------
    def enqueue(self, e: Entry) -> None:
        """A message just made durable (intake, DSN): into memory while there is room (the
        hot path: no spool read), else left in the spool for a refill to find."""
        if e.queue_id in self.entries:  # a refill already read it from the spool
            return
        if len(self.entries) >= self.max_entries and not self._room_for(e):
            self._set_aside(e, self.clock())
            return
        self._admit(e)

    def _admit(self, e: Entry) -> None:
        self.entries[e.queue_id] = e
        if e.held:
            return
        if e.next_attempt <= self.clock():
            self._dispatch(e)
        else:
            self._push_timer(e)

    def _push_timer(self, e: Entry) -> None:
        e.state = WAITING
        heapq.heappush(self._timers, (e.next_attempt, e.queue_id))
        if self._timers[0][1] == e.queue_id:
            self._wake.set()
        if len(self._timers) > 2 * len(self.entries) + 1024:
            # Stale items (set aside, retried, finished) would otherwise pile up until due.
            self._timers = [
                (x.next_attempt, q)
                for q, x in self.entries.items()
                if x.state == WAITING and not x.held
            ]
            heapq.heapify(self._timers)

    # -- the bounded in-memory set -----------------------------------------------------
    def _drop(self, queue_id: str) -> Entry | None:
        """Take a message out of memory (finished, deleted or set aside)."""
        e = self.entries.pop(queue_id, None)
        if e is not None:
            self._pinned.discard(queue_id)
            if self._refill_task is not None:
                self._skip.add(queue_id)
            elif self._cursor is not None and len(self.entries) <= self.max_entries - self._batch:
                self._wake.set()  # room for a refill
        return e

    def _lower_cursor(self, key: tuple[float, str]) -> None:
        if self._cursor is None or key < self._cursor:
            self._cursor = key
        if self._refill_task is not None and (self._low is None or key < self._low):
            self._low = key

    def _set_aside(self, e: Entry, now: float) -> None:
        """Leave a message to the spool only (not in memory, or just dropped): a later
        refill finds it by its key, or, for a paused upstream, once the pause ends."""
        uq = self.queues.get(e.upstream)
        if uq is not None and uq.paused_until > now:
            low = self._held_back.get(e.upstream)
            if low is None or e.key < low:
                self._held_back[e.upstream] = e.key
        else:
            self._lower_cursor(e.key)
        self.spool.drop_cached_body(e.queue_id)
        self._wake.set()

    def _room_for(self, e: Entry) -> bool:
        now = self.clock()
        if now < self._no_victims_until:
            return False
        if self._make_room(self._batch, now, keep=e.upstream) == 0:
            self._no_victims_until = now + 1.0  # no full scan per message while nothing frees
            return False
        return True

    def _make_room(self, n: int, now: float, keep: str | None = None) -> int:
        """Set aside up to n entries, least urgent first: held ones, then those waiting for a
        later retry (latest first), then the tail of paused upstreams' ready queues (other
        than `keep`'s). Returns how many left memory."""
        held: list[Entry] = []
        waiting: list[Entry] = []
        for e in self.entries.values():
            if e.held:
                if e.state != ACTIVE:
                    held.append(e)
            elif e.state == WAITING and e.next_attempt > now and e.queue_id not in self._pinned:
                waiting.append(e)
        victims = held[:n]
        if len(victims) < n:
            victims += heapq.nlargest(n - len(victims), waiting, key=lambda x: x.next_attempt)
        for e in victims:
            self._drop(e.queue_id)
            self._lower_cursor(e.key)  # held: in case the spool missed the hold
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
                self._drop(tail.queue_id)
                self._set_aside(tail, now)
                freed += 1
        return freed

    def _restore_held_back(self, now: float) -> None:
        """Messages set aside for a paused upstream become findable when the pause ends."""
        for up, key in list(self._held_back.items()):
            uq = self.queues.get(up)
            if uq is None or uq.paused_until <= now:
                del self._held_back[up]
                self._lower_cursor(key)

    def _maybe_refill(self, now: float) -> None:
        if self._refill_task is not None or not self._running:
            return
        if self._held_back:
            self._restore_held_back(now)
        if self._cursor is None:
            return
        if now < self._error_until:
            return
        if self.max_entries - len(self.entries) >= self._batch or (
            self._cursor[0] <= now and now >= self._refill_not_before
        ):
            self._refill_task = asyncio.create_task(self._refill(), name="scheduler-refill")

            def done(_: asyncio.Task[None]) -> None:
                self._refill_task = None
                self._wake.set()

            self._refill_task.add_done_callback(done)

    async def _refill(self) -> None:
        """Read the next messages in due order from the spool into memory. When the spool
        holds mail already due and memory is full, less urgent entries are set aside first."""
        self._low = None
        self._skip = set()
        now = self.clock()
        cursor = self._cursor
        assert cursor is not None
        room = self.max_entries - len(self.entries)
        room_freed = room >= self._batch
        if not room_freed:  # the spool holds mail due now: less urgent entries make room
            room += self._make_room(self._batch - room, now)
        admitted = 0
        failed = False
        next_cursor: tuple[float, str] | None = cursor
        try:
            if room > 0:
                # Read past the room: rows for a paused upstream are set aside, not loaded.
                batch = await self.spool.due(cursor, max(room, self._batch))
                now = self.clock()
                next_cursor = None if batch.exhausted or batch.last is None else _after(batch.last)
                for due, m in batch.messages:
                    if m.queue_id in self.entries or m.queue_id in self._skip:
                        continue
                    e = Entry.from_spool(m, due)
                    if not e.pending:
                        continue
                    uq = self.queues.get(e.upstream)
                    if uq is not None and uq.paused_until > now:
                        self._set_aside(e, now)
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
            self._cursor = next_cursor
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
        self._lower_cursor((when, queue_id))
        self._refill_not_before = 0.0
        self._wake.set()

    def adopt(self, m: SpoolMessage) -> Entry | None:
        """Load one message from the spool into memory now (an operator's bounce needs it),
        even past the cap (the next refills even it out)."""
        e = self.entries.get(m.queue_id)
        if e is None:
            e = Entry.from_spool(m)
            if not e.pending:
                return None
            self._admit(e)
        return e

    async def _timer_loop(self) -> None:
        while self._running:
            now = self.clock()
            while self._timers and self._timers[0][0] <= now:
                when, qid = heapq.heappop(self._timers)
                e = self.entries.get(qid)
                # Stale heap items (retried, held, rescheduled) are skipped, not removed eagerly.
                if e is None or e.held or e.state != WAITING or e.next_attempt != when:
                    continue
                self._dispatch(e)
            self._maybe_refill(now)
            timeout = (self._timers[0][0] - now) if self._timers else 3600.0
            if self._cursor is not None and self._refill_task is None:
                when = max(self._cursor[0], self._refill_not_before, self._error_until)
                timeout = min(timeout, when - now)
            for up in self._held_back:
                uq = self.queues.get(up)
                timeout = min(timeout, (uq.paused_until - now) if uq else 0.0)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, min(timeout, 3600.0)))
            except TimeoutError:
                pass

    def route_entry(self, e: Entry) -> tuple[Upstream, EgressPool]:
        r = route(self.config, Attribution(e.org, e.account, "queued"))
        return r.upstream, r.pool

    def _dispatch(self, e: Entry) -> None:
        upstream, _ = self.route_entry(e)
        e.upstream = upstream.id
        e.state = READY
        uq = self.queues.get(upstream.id)
        if uq is None:
            uq = self.queues[upstream.id] = UpstreamQueue(upstream.id)
        uq.push(e)
        self._spawn(uq)

    def _cap(self, upstream_id: str) -> int:
        up = self.config.upstreams.get(upstream_id)
        if up is not None and up.throttle.max_connections:
            # Never more tasks than this process may hold leases: a task without one would
            # pause the whole upstream queue until a lease frees (LEASE_POLL).
            return self.gate.local_cap(up.throttle.max_connections)
        return self.default_concurrency

    def _spawn(self, uq: UpstreamQueue) -> None:
        if not self._running or uq.waking:
            return
        if uq.paused_until > self.clock():
            self._wake_later(uq, uq.paused_until - self.clock())
            return
        while uq.active < self._cap(uq.upstream_id) and uq.active < uq.size:
            uq.active += 1
            t = asyncio.create_task(self._worker(uq), name=f"deliver-{uq.upstream_id}")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    def _wake_later(self, uq: UpstreamQueue, delay: float) -> None:
        uq.waking = True

        def wake() -> None:
            uq.waking = False
            self._spawn(uq)

        asyncio.get_running_loop().call_later(max(0.01, delay), wake)

    # -- delivery ----------------------------------------------------------------------
    async def _worker(self, uq: UpstreamQueue) -> None:
        try:
            while self._running:
                if uq.paused_until > self.clock():
                    self._wake_later(uq, uq.paused_until - self.clock())
                    return
                e = uq.pop()
                if e is None:
                    return
                if self.entries.get(e.queue_id) is not e or e.held or e.state != READY:
                    continue
                upstream, pool = self.route_entry(e)
                if upstream.id != uq.upstream_id:  # policy reloaded while it waited
                    self._dispatch(e)
                    continue
                wait = await self.gate.acquire(upstream)
                if wait > 0:
                    uq.unpop(e)
                    uq.paused_until = max(uq.paused_until, self.clock() + wait)
                    self.events.metrics.limit_hits.labels("upstream").inc()
                    continue
                e.state = ACTIVE
                try:
                    await self._attempt(e, upstream, self._pick_source(pool))
                except Exception:
                    # A bug must not lose mail: the message stays pending and is retried.
                    log.exception("delivery attempt of %s failed unexpectedly", e.queue_id)
                    self._pinned.add(e.queue_id)  # the spool has an earlier due
                    self._reschedule(e, self.clock() + self.retry.delay(1, self.rand.random()))
                finally:
                    await self.gate.release(upstream)
        finally:
            uq.active -= 1
            if self._running and uq.size > 0 and not uq.waking:
                self._spawn(uq)

    def _pick_source(self, pool: EgressPool) -> EgressSource:
        i = self._rr.get(pool.name, 0)
        self._rr[pool.name] = i + 1
        return pool.sources[i % len(pool.sources)]

    async def _attempt(self, e: Entry, upstream: Upstream, source: EgressSource) -> None:
        rcpts = list(e.pending)
        data: bytes | None = None
        if upstream.unavailable:
            reply = Reply(
                451, f"4.3.5 upstream {upstream.id} is unavailable: {upstream.unavailable}", "4.3.5"
            )
            results = [RecipientResult(r, Outcome.DEFERRED, reply) for r in rcpts]
        else:
            try:
                data = await self.spool.read_body(e.queue_id)
            except KeyError:
                self._drop(e.queue_id)  # deleted by an operator meanwhile
                return
            results = await self.deliverer.deliver(upstream, source, e.sender, rcpts, data)
        self._note_health(upstream, results)
        # The upstream has answered: free the delivery slot now and commit the outcome in the
        # background (a slot waiting for the spool's fsync cost ~20% of a 100 ms upstream's
        # ceiling). The entry stays ACTIVE until the outcome is committed, so it cannot be
        # dispatched twice meanwhile; stop() waits for these tasks.
        t = asyncio.create_task(self._record_safely(e, upstream, source, results, data))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _note_health(self, upstream: Upstream, results: Sequence[RecipientResult]) -> None:
        """A "slow down" reply, or no answer from the host, pauses the upstream's whole
        ready queue at once (before this worker takes its next message); a delivery resets
        the slow-down."""
        throttled = any(r.throttled for r in results)
        # No answer from the host at all (refused, unreachable, timed out before the
        # greeting): like Postfix's dead destination, stop every queued message from
        # trying its own connection; they wait in the ready queue until the pause ends.
        unreachable = bool(results) and all(
            r.outcome is Outcome.DEFERRED and r.reply.enhanced == "4.4.1" for r in results
        )
        if throttled or unreachable:
            pause = self.gate.slow_down(upstream)
            uq = self.queues.get(upstream.id)
            if uq is not None:
                uq.paused_until = max(uq.paused_until, self.clock() + pause)
            why = "asked to slow down" if throttled else "is not answering"
            log.warning("upstream %s %s; pausing its queue %.0fs", upstream.id, why, pause)
        elif any(r.outcome is Outcome.DELIVERED for r in results):
            self.gate.recovered(upstream)

    async def _record_safely(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource,
        results: Sequence[RecipientResult],
        data: bytes | None,
    ) -> None:
        try:
            await self._record(e, upstream, source, results, data)
        except Exception:
            # Not recorded: the spool still says pending, so it is simply tried again (a
            # possible duplicate, never a loss).
            log.exception("recording the outcome of %s failed", e.queue_id)
            self._pinned.add(e.queue_id)  # the spool has an earlier due: keep it in memory
            self._reschedule(e, self.clock() + self.retry.delay(1, self.rand.random()))

    async def _record(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource | None,
        results: Sequence[RecipientResult],
        data: bytes | None,
    ) -> None:
        now = self.clock()
        updates: list[RecipientUpdate] = []
        failed: list[tuple[str, str, Reply]] = []
        base = {
            "queue_id": e.queue_id,
            "org": e.org,
            "account": e.account,
            "upstream": upstream.id,
            "egress": source.address if source else None,
        }
        next_times: list[float] = []
        answered = {r.recipient for r in results}
        missing = any(r not in answered for r in e.pending)
        for res in results:
            attempts = e.pending.get(res.recipient, 0) + 1
            fields = dict(
                base,
                recipient=res.recipient,
                attempt=attempts,
                delay=round(now - e.received_at, 3),
                reply=str(res.reply),
            )
            status, when = self._next_state(e, res, attempts, now)
            updates.append(RecipientUpdate(res.recipient, status, attempts, when, str(res.reply)))
            if status is RcptStatus.PENDING:
                self.events.emit(Disposition.DEFERRED, **fields, retry_in=round(when - now, 1))
                e.pending[res.recipient] = attempts
                next_times.append(when)
                continue
            self.events.emit(_FINAL_EVENT[status], **fields)
            e.pending.pop(res.recipient, None)
            if status is not RcptStatus.DELIVERED:
                failed.append((res.recipient, status.value, res.reply))
        await self.spool.update(e.queue_id, updates, upstream=upstream.id)
        if missing:
            self._pinned.add(e.queue_id)  # some recipients kept their own (earlier) time
        else:
            self._pinned.discard(e.queue_id)
        if failed:
            await self._send_dsn(e, failed, data)
        if e.pending:
            self._reschedule(e, min(next_times) if next_times else now)
        else:
            self._drop(e.queue_id)

    def _next_state(
        self, e: Entry, res: RecipientResult, attempts: int, now: float
    ) -> tuple[RcptStatus, float]:
        """A recipient's state after this attempt, and when to try it next (0 when final)."""
        if res.outcome is Outcome.DELIVERED:
            return RcptStatus.DELIVERED, 0.0
        if res.outcome is Outcome.BOUNCED:
            return RcptStatus.BOUNCED, 0.0
        when = self.retry.next_attempt(
            now=now, received_at=e.received_at, failures=attempts, rand=self.rand.random()
        )
        return (RcptStatus.EXPIRED, 0.0) if when is None else (RcptStatus.PENDING, when)

    def _reschedule(self, e: Entry, when: float) -> None:
        e.next_attempt = when
        if self.entries.get(e.queue_id) is e and not e.held:
            self._push_timer(e)

    async def _send_dsn(
        self, e: Entry, failed: list[tuple[str, str, Reply]], data: bytes | None
    ) -> None:
        if not should_send_dsn(e.sender, e.is_dsn):
            return
        if data is None:
            try:
                data = await self.spool.read_body(e.queue_id)
            except KeyError:
                data = b""
        headers = data[: header_end(data)]
        dsn = build_dsn(
            reporting_mta=self.config.hostname,
            original_sender=e.sender,
            queue_id=e.queue_id,
            arrival=e.received_at,
            failures=failed,
            original_headers=headers,
            now=self.clock(),
        )
        try:
            qid = await self.spool.put(
                sender="",
                recipients=[e.sender],
                data=dsn,
                client="relay",
                org=e.org,
                account=e.account,
                upstream=e.upstream,
                is_dsn=True,
            )
        except Exception:
            log.exception("could not queue the DSN for %s", e.queue_id)
            return
        self.events.emit(
            Disposition.QUEUED,
            queue_id=qid,
            org=e.org,
            account=e.account,
            sender="",
            recipients=1,
            dsn_for=e.queue_id,
        )
        self.enqueue(Entry(qid, "", e.org, e.account, self.clock(), True, False, {e.sender: 0}))

    # -- operator actions (queue tools) ------------------------------------------------
    def retry_now(self, queue_id: str) -> bool:
        e = self.entries.get(queue_id)
        if e is None or e.held or e.state != WAITING:
            return e is not None and not e.held
        e.next_attempt = self.clock()
        self._dispatch(e)
        return True

    def hold(self, queue_id: str) -> bool:
        e = self.entries.get(queue_id)
        if e is None:
            return False
        e.held = True
        return True

    def release(self, queue_id: str) -> bool:
        e = self.entries.get(queue_id)
        if e is None:
            return False
        if e.held:
            e.held = False
            if e.state != ACTIVE:
                e.next_attempt = min(e.next_attempt, self.clock())
                self._dispatch(e)
        return True

    def forget(self, queue_id: str) -> bool:
        return self._drop(queue_id) is not None

    async def bounce(
        self, queue_id: str, text: str = "5.0.0 returned to sender by the relay administrator"
    ) -> bool:
        e = self.entries.get(queue_id)
        if e is None or e.state == ACTIVE:
            return False
        upstream = self.config.upstreams.get(e.upstream) or self.route_entry(e)[0]
        reply = Reply(550, text, "5.0.0")
        e.state = ACTIVE
        await self._record(
            e, upstream, None, [RecipientResult(r, Outcome.BOUNCED, reply) for r in e.pending], None
        )
        return True


def _after(key: tuple[float, str]) -> tuple[float, str]:
    """The smallest key above `key` (queue ids have a fixed length, so id + NUL is next)."""
    return (key[0], key[1] + "\0")
