"""Scheduler: decides when each queued message is tried, on which upstream, and how many at once.

Waiting messages sit in one timer heap; due messages are routed by the *current* policy and
join their upstream's ready queue (relay/scheduler/queues.py), which is fair between
organisations so one organisation's campaign cannot starve another's receipts. Each upstream
has at most `max_connections` deliveries in flight; the `Gate` (relay.limits) decides when the
next may start (minimum interval, hourly/daily quotas, shared leases) and an upstream that
answers "slow down" pauses as a whole. Outcomes are written back to the spool by the
`Recorder` (outcomes.py); bounced and expired recipients go to the bounce notifier, which
queues one DSN. Memory is bounded by the `ActiveWindow` (window.py). Nothing here ever drops
a message: every path ends in the spool as delivered, bounced, expired or still pending.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Callable, Sequence

from relay.config.model import Config
from relay.core.dsn import DsnParams
from relay.core.errors import SpoolError
from relay.core.model import (
    EgressPool,
    EgressSource,
    Outcome,
    RecipientResult,
    Reply,
    Upstream,
    UpstreamPause,
)
from relay.core.waits import SLOW_DOWN, Wait, clock_time
from relay.events import MailLog
from relay.policy import Attribution, route
from relay.policy.dsnroute import dsn_route
from relay.policy.failover import fail_over
from relay.scheduler.entry import ACTIVE, READY, WAITING, Entry
from relay.scheduler.health import UpstreamHealth
from relay.scheduler.outcomes import Recorder
from relay.scheduler.ports import BounceNotifier, Deliverer, Gate, NoGate
from relay.scheduler.queues import UpstreamQueue
from relay.scheduler.retry import RetryPolicy
from relay.scheduler.unusable import UnusableSince
from relay.scheduler.window import ActiveWindow
from relay.spool import Spool, SpoolMessage
from relay.spool.verification import VerificationStore

log = logging.getLogger("relay.scheduler")


class Scheduler:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        deliverer: Deliverer,
        events: MailLog,
        *,
        bounces: BounceNotifier,
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
        self.bounces = bounces
        self.gate: Gate = gate or NoGate()
        self.default_concurrency = default_concurrency
        self.clock = clock
        self.rand = rand or random.Random()
        self.queues: dict[str, UpstreamQueue] = {}
        self._timers: list[tuple[float, str]] = []  # (next_attempt, queue_id); stale ones skipped
        self._fixed_cap = max_entries
        self.window = ActiveWindow(
            spool,
            self.queues,
            max_entries=max_entries or config.relay.spool.active_messages,
            clock=clock,
            admit=lambda e: self._admit(e),  # late-bound: tests count admissions
            wake=self._wake_up,
        )
        self.entries = self.window.entries  # queue id -> entry, for every message in memory
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        self._loop_task: asyncio.Task[None] | None = None
        self._rr: dict[str, int] = {}
        self.retry = self._retry_policy(config)
        self.recorder = Recorder(spool, events, self.retry, clock=clock, rand=self.rand)
        # Upstreams paused for a person (credentials, configuration, a daily sending limit).
        self.health = UpstreamHealth(clock=clock)
        # Which verify: true upstreams are verified (set by the runtime; None: none are).
        self.verification: VerificationStore | None = None
        self.unusable = UnusableSince()  # since when upstreams are unusable (failover)

    @staticmethod
    def _retry_policy(config: Config) -> RetryPolicy:
        r = config.relay.retry
        return RetryPolicy(tuple(r.schedule), r.jitter, r.max_age)

    @property
    def max_entries(self) -> int:
        return self.window.max_entries

    def _wake_up(self) -> None:
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------
    async def recover(self) -> int:
        """Load the first `max_entries` deliverable messages in due order at start (before
        `start`); the rest are read by refills. Returns how many were loaded."""
        return await self.window.load_first(self._push_timer)

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
        self.retry = self.recorder.retry = self._retry_policy(config)
        self.window.max_entries = self._fixed_cap or config.relay.spool.active_messages
        # A reload is how credentials and configuration get fixed: look again now.
        for uid in self.health.clear_kinds(("auth", "policy")):
            self.resume(uid)

    def resume(self, upstream_id: str) -> bool:
        """End a pause for a person (a test succeeded, a reload): its mail goes now."""
        if self.health.clear(upstream_id):
            log.info("upstream %s resumed; its mail goes now", upstream_id)
        uq = self.queues.get(upstream_id)
        if uq is None:
            return False
        uq.paused_until = 0.0
        uq.waking = False
        self._spawn(uq)
        self.window.maybe_refill(self.clock())  # what was set aside for the pause
        return True

    # -- intake ------------------------------------------------------------------------
    def enqueue(self, e: Entry) -> None:
        """A message just made durable (intake, DSN): into memory while there is room (the
        hot path: no spool read), else left in the spool for a refill to find."""
        if e.queue_id in self.entries:  # a refill already read it from the spool
            return
        if self.window.full and not self.window.room_for(e):
            self.window.set_aside(e, self.clock())
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
            if self._running:
                self.window.maybe_refill(now)
            timeout = (self._timers[0][0] - now) if self._timers else 3600.0
            timeout = min(timeout, self.window.next_check(now))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.0, min(timeout, 3600.0)))
            except TimeoutError:
                pass

    def route_entry(self, e: Entry) -> tuple[Upstream, EgressPool]:
        if e.is_dsn:  # to the sender, through the DSN upstream (relay/policy/dsnroute.py)
            return dsn_route(self.config, e.org)
        verified = self.verification.verified_ids(self.config) if self.verification else None
        r = route(self.config, Attribution(e.org, e.account, "queued"), verified)
        r, e.via = fail_over(
            self.config, r, unusable=self.unusable.unusable,
            deferrals=max(e.pending.values(), default=0), now=self.clock(),
        )
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
        if self.health.probing(upstream_id):
            return 1  # a paused upstream is looked at again with one delivery
        if up is not None and up.throttle.max_connections:
            # Never more tasks than this process may hold leases: a task without one would
            # pause the whole upstream queue until a lease frees (LEASE_POLL).
            return self.gate.local_cap(up.throttle.max_connections)
        return self.default_concurrency

    def _spawn(self, uq: UpstreamQueue) -> None:
        if not self._running or uq.waking:
            return
        until = max(uq.paused_until, self.health.until(uq.upstream_id))
        if until > self.clock():
            self._wake_later(uq, until - self.clock())
            return
        cap = self._cap(uq.upstream_id)
        if uq.slot_tasks is not None:  # short of connections: one more asks, when it may
            now = self.clock()
            if uq.slots_until > now:
                cap = min(cap, uq.slot_tasks)
                if uq.active == 0 and cap == 0:  # nobody left to ask then: wake up for it
                    self._wake_later(uq, uq.slots_until - now)
                    return
            else:
                cap = min(cap, uq.slot_tasks + 1)
        while uq.active < cap and uq.active < uq.size:
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
                until = max(uq.paused_until, self.health.until(uq.upstream_id))
                if until > self.clock():
                    self._wake_later(uq, until - self.clock())
                    return
                if (uq.slot_tasks is not None and uq.active <= uq.slot_tasks
                        and uq.slots_until <= self.clock()):
                    self._spawn(uq)  # time to ask for one more connection
                e = uq.pop()
                if e is None:
                    uq.slot_tasks = None
                    return
                if self.entries.get(e.queue_id) is not e or e.held or e.state != READY:
                    continue
                upstream, pool = self.route_entry(e)
                if upstream.id != uq.upstream_id:  # policy reloaded while it waited
                    self._dispatch(e)
                    continue
                wait = await self.gate.acquire(upstream)
                if wait is not None:
                    uq.unpop(e)
                    uq.why = wait
                    self.events.metrics.limit_hits.labels("upstream").inc()
                    if wait.whole_queue:
                        uq.paused_until = max(uq.paused_until, self.clock() + wait.seconds)
                        continue
                    # Every connection is held: the deliveries holding them go on with the
                    # queue; this one ends (the only one: it asks again shortly).
                    uq.slot_tasks = uq.active - 1
                    uq.slots_until = self.clock() + wait.seconds
                    if uq.slot_tasks == 0:
                        self._wake_later(uq, wait.seconds)
                    return
                if uq.slot_tasks is not None and uq.active > uq.slot_tasks:
                    uq.slot_tasks = uq.active  # this one got a connection: one more may ask
                    self._spawn(uq)
                uq.why = None
                e.state = ACTIVE
                try:
                    await self._attempt(e, upstream, self._pick_source(pool))
                except Exception:
                    # A bug must not lose mail: the message stays pending and is retried.
                    log.exception("delivery attempt of %s failed unexpectedly", e.queue_id)
                    self.window.pinned.add(e.queue_id)  # the spool has an earlier due
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
            # A configuration problem: the upstream waits for a reload, no retry is counted.
            why = UpstreamPause("policy", str(reply), "make the secret reference readable by the"
                                " relay (env:, file: or credential:), then `relay reload`")
            results = [RecipientResult(r, Outcome.DEFERRED, reply, pause=why) for r in rcpts]
        else:
            try:
                body = await self.spool.body(e.queue_id)
            except KeyError:
                self.window.drop(e.queue_id)  # deleted by an operator meanwhile
                return
            data = body.data
            if e.dsn:  # RFC 3461 parameters, passed on to an upstream that offers DSN
                results = await self.deliverer.deliver(
                    upstream, source, e.sender, rcpts, data, dsn=DsnParams.decode(e.dsn),
                    wire=body.wire,
                )
            else:
                results = await self.deliverer.deliver(
                    upstream, source, e.sender, rcpts, data, wire=body.wire
                )
        paused = [r for r in results if r.pause is not None]
        if paused:
            if len(paused) == len(results):  # unusable for now: the failover clock runs
                self.unusable.note(upstream.id, results, self.clock())
            self._pause(e, upstream, source, paused)
            if len(paused) == len(results):
                return  # not an attempt: it waits at the head of its queue, nothing counted
        self._note_health(upstream, results)
        # The upstream has answered: free the delivery slot now and commit the outcome in the
        # background (a slot waiting for the spool's fsync cost ~20% of a 100 ms upstream's
        # ceiling). The entry stays ACTIVE until the outcome is committed, so it cannot be
        # dispatched twice meanwhile; stop() waits for these tasks.
        t = asyncio.create_task(self._record_safely(e, upstream, source, results, data))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _pause(
        self, e: Entry, upstream: Upstream, source: EgressSource, paused: list[RecipientResult]
    ) -> None:
        """The upstream needs a person: pause it (relay/scheduler/health.py), say so in the
        mail log, and put the message back at the head of its queue."""
        why = paused[0].pause
        assert why is not None
        p = self.health.pause(upstream.id, why)
        retry_in = round(max(0.0, p.until - self.clock()), 1)
        t = asyncio.create_task(self._note_paused(e, upstream, source, paused, retry_in))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        log.warning("upstream %s paused (%s), its mail waits: %s; next step: %s",
                    upstream.id, why.kind, why.reason, why.next_step)
        uq = self.queues.get(upstream.id)
        if uq is None:
            uq = self.queues[upstream.id] = UpstreamQueue(upstream.id)
        # The queue's own pause too: the bounded window then sets its tail aside for others.
        uq.paused_until = max(uq.paused_until, p.until)
        if len(paused) == len(e.pending) and self.entries.get(e.queue_id) is e:
            e.state = READY
            uq.unpop(e)
        # Organisations that fail over leave a paused upstream like a slowed-down one.
        self._reroute_when_failover_may(uq, p.until - self.clock())

    async def _note_paused(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource,
        paused: list[RecipientResult],
        retry_in: float,
    ) -> None:
        try:
            await self.recorder.paused(e, upstream, source, paused, retry_in)
        except Exception:  # the message is still queued; only the note is missing
            log.exception("recording the pause of %s failed", e.queue_id)

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
        self.unusable.note(upstream.id, results, self.clock())
        if throttled or unreachable:
            first = next(r for r in results if r.throttled or unreachable)
            reason = f"{'slow-down' if throttled else 'not answering'} after: {first.reply}"
            pause = self.gate.slow_down(upstream, reason)
            self.pause_upstream(upstream.id, pause, Wait(
                pause, SLOW_DOWN,
                f"upstream paused until {clock_time(time.time() + pause)} ({reason})"))
            why = "asked to slow down" if throttled else "is not answering"
            log.warning("upstream %s %s; pausing its queue %.0fs", upstream.id, why, pause)
        elif any(r.outcome is Outcome.DELIVERED for r in results):
            self.gate.recovered(upstream)
            if self.health.clear(upstream.id):
                log.info("upstream %s delivers again; its pause is over", upstream.id)

    def pause_upstream(self, upstream_id: str, seconds: float, why: Wait) -> None:
        """No delivery to `upstream_id` for `seconds`; `why` is what its mail shows. Where
        its organisations fail over, the queue is routed again once that may apply."""
        uq = self.queues.get(upstream_id)
        if uq is None:
            return
        uq.paused_until = max(uq.paused_until, self.clock() + seconds)
        uq.why = why
        self._reroute_when_failover_may(uq, seconds)

    def _reroute_when_failover_may(self, uq: UpstreamQueue, seconds: float) -> None:
        """A queue paused for `seconds`: where its organisations fail over, route it again
        once that may apply (their `failover_after` since the upstream became unusable)."""
        afters = [o.failover_after for o in self.config.orgs.values() if o.failover]
        if afters and self._running:
            since = self.unusable.unusable.get(uq.upstream_id)
            start = since.since if since is not None else self.clock()
            delay = max(0.0, start + min(afters) - self.clock())
            if delay < seconds:
                asyncio.get_running_loop().call_later(delay + 0.01, self._reroute, uq)

    def _reroute(self, uq: UpstreamQueue) -> None:
        """Send the ready entries that the policy (failover) now routes elsewhere there."""
        if not self._running:
            return
        keep: list[Entry] = []
        while (e := uq.pop()) is not None:
            if self.entries.get(e.queue_id) is not e or e.held or e.state != READY:
                continue  # stale: the queue skips these anyway
            if self.route_entry(e)[0].id != uq.upstream_id:
                self._dispatch(e)
            else:
                keep.append(e)
        for e in keep:
            uq.push(e)

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
        except Exception as exc:
            # Not recorded: the spool still says pending, so it is simply tried again (a
            # possible duplicate, never a loss). A spool failure is the spool's to report
            # (once, relay/spool/health.py); only a bug here gets a traceback.
            if isinstance(exc, SpoolError):
                log.debug("recording the outcome of %s failed: %s", e.queue_id, exc.reason)
            else:
                log.exception("recording the outcome of %s failed", e.queue_id)
            self.window.pinned.add(e.queue_id)  # the spool has an earlier due: keep it in memory
            self._reschedule(e, self.clock() + self.retry.delay(1, self.rand.random()))

    async def _record(
        self,
        e: Entry,
        upstream: Upstream,
        source: EgressSource | None,
        results: Sequence[RecipientResult],
        data: bytes | None,
        operator: str | None = None,
    ) -> None:
        done = await self.recorder.record(e, upstream, source, results, data=data,
                                          operator=operator)
        if done.some_unanswered:
            self.window.pinned.add(e.queue_id)  # some recipients kept their own (earlier) time
        else:
            self.window.pinned.discard(e.queue_id)
        if done.failed:
            dsn = await self.bounces.bounced(
                e, done.failed, data, reporting_mta=self.config.hostname
            )
            if dsn is not None:
                self.enqueue(dsn)
        if done.next_due is not None:
            self._reschedule(e, done.next_due)
        else:
            self.window.drop(e.queue_id)

    def _reschedule(self, e: Entry, when: float) -> None:
        e.next_attempt = when
        if self.entries.get(e.queue_id) is e and not e.held:
            self._push_timer(e)

    # -- operator actions (relay/ops/queueops.py) --------------------------------------
    def operator_due(self, queue_id: str, when: float) -> None:
        """An operator made a message that was not in memory due at `when` (retry, release):
        the spool already says so; the next refill loads it. A refill may have loaded it,
        with its old due time, while the spool was being written: then it is due here."""
        e = self.entries.get(queue_id)
        if e is not None and not e.held and e.state == WAITING and e.next_attempt > when:
            e.next_attempt = when
            self._dispatch(e)
            return
        self.window.operator_due(queue_id, when)

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
        return self.window.drop(queue_id) is not None

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
            e, upstream, None, [RecipientResult(r, Outcome.BOUNCED, reply) for r in e.pending], None,
            operator=text,
        )
        return True
