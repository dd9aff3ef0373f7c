"""relay.limits against both backends: the in-memory store and a real redis-server.

Intake limits (451 4.7.1 naming the limit, check-all-then-hit, recipients per message,
connections per client), the upstream gate (leases, minimum interval, quotas, slow-down
backoff), lease expiry after a crash, and the Redis fallback (local or tempfail).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from limits.errors import StorageError

from relay.config.schema import LimitsConf
from relay.core.errors import RateLimited
from relay.core.model import Throttle, TlsMode, Upstream
from relay.core.waits import Wait
from relay.events import Metrics
from relay.limits import (
    Failover,
    IntakeRateLimiter,
    Limits,
    MachineStore,
    MemoryStore,
    RedisStore,
    Store,
    UpstreamGate,
    Window,
)
from relay.limits.store import BackendError
from relay.policy import AppliedLimit
from tests.redisproc import RedisServer
from tests.relayproc import RelayConfig


def secs(wait: Wait | None) -> float:
    """The gate's answer in seconds (0: go now)."""
    return 0.0 if wait is None else wait.seconds


def upstream(uid: str = "sink", **throttle: object) -> Upstream:
    return Upstream(uid, "mx.test", 25, TlsMode.NONE, "default", throttle=Throttle(**throttle))  # type: ignore[arg-type]


def applied(scope: str, key: str, **kw: int) -> AppliedLimit:
    return AppliedLimit(
        scope,
        key,
        kw.get("per_minute"),
        kw.get("per_hour"),
        kw.get("per_day"),
        kw.get("recipients_per_message"),
    )


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


_seq = 0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, shared_redis: RedisServer) -> AsyncIterator[Store]:
    global _seq
    _seq += 1
    if request.param == "memory":
        s: Store = MemoryStore(f"node{_seq}")
    else:
        s = RedisStore(shared_redis.url, node_id=f"node{_seq}")
        await s.redis.flushdb()  # type: ignore[attr-defined]
    yield s
    await s.close()


# -- intake limits --------------------------------------------------------------------------


async def test_intake_limit_answers_451_naming_the_limit_and_when(store: Store) -> None:
    metrics = Metrics()
    lim = IntakeRateLimiter(store, metrics, max_connections=None)
    limits = [applied("organisation", "acme", per_minute=3)]
    for _ in range(3):
        await lim.check_message(limits, 1)
    with pytest.raises(RateLimited) as info:
        await lim.check_message(limits, 1)
    reply = info.value.reply()
    assert reply.startswith(
        "451 4.7.1 organisation acme: 3 messages per minute exceeded, try again in "
    )
    seconds = int(reply.rsplit("try again in ", 1)[1].split()[0])
    assert 1 <= seconds <= 60
    assert metrics.limit_hits.labels("organisation")._value.get() == 1


async def test_a_message_refused_by_one_limit_uses_none_of_the_others(store: Store) -> None:
    lim = IntakeRateLimiter(store, Metrics(), max_connections=None)
    org = applied("organisation", "acme", per_hour=5)
    await lim.check_message([org, applied("sender", "a@acme.test", per_hour=1)], 1)
    for _ in range(3):
        with pytest.raises(RateLimited) as info:
            await lim.check_message([org, applied("sender", "a@acme.test", per_hour=1)], 1)
        assert "sender a@acme.test: 1 messages per hour exceeded" in info.value.reply()
    # Only the accepted message counted against the organisation: 4 more fit.
    for i in range(4):
        await lim.check_message([org, applied("sender", f"b{i}@acme.test", per_hour=1)], 1)
    with pytest.raises(RateLimited) as info:
        await lim.check_message([org], 1)
    assert "organisation acme: 5 messages per hour exceeded" in info.value.reply()


async def test_recipients_per_message(store: Store) -> None:
    lim = IntakeRateLimiter(store, Metrics(), max_connections=None)
    limits = [applied("account", "a@acme.test", recipients_per_message=2, per_minute=1)]
    with pytest.raises(RateLimited) as info:
        await lim.check_message(limits, 3)
    assert info.value.reply().startswith(
        "451 4.7.1 account a@acme.test: 2 recipients per message exceeded (3 given)"
    )
    await lim.check_message(limits, 2)  # the refused message did not use the per-minute limit


async def test_concurrent_connections_per_client() -> None:
    lim = IntakeRateLimiter(MemoryStore(), Metrics(), max_connections=2)
    lim.connection_opened("192.0.2.1")
    lim.connection_opened("192.0.2.1")
    lim.connection_opened("192.0.2.2")
    with pytest.raises(RateLimited) as info:
        lim.connection_opened("192.0.2.1")
    assert "client 192.0.2.1: 2 concurrent connections exceeded" in info.value.reply()
    lim.connection_closed("192.0.2.1")
    lim.connection_opened("192.0.2.1")
    assert lim.connections() == {"192.0.2.1": 2, "192.0.2.2": 1}


# -- the upstream gate ----------------------------------------------------------------------


async def test_leases_cap_concurrency_and_come_back_on_release(store: Store) -> None:
    gate = UpstreamGate(store, Metrics())
    up = upstream(max_connections=2)
    assert secs(await gate.acquire(up)) == 0
    assert secs(await gate.acquire(up)) == 0
    assert secs(await gate.acquire(up)) > 0
    await gate.release(up)
    assert secs(await gate.acquire(up)) == 0
    await gate.close()
    assert await store.leases("sink") == 0


async def test_a_crashed_nodes_leases_expire(store: Store) -> None:
    # "Crash": a lease is taken and never released or renewed.
    crashed = await store.lease("sink", 1, ttl=0.3)
    assert crashed is not None
    assert await store.lease("sink", 1, ttl=0.3) is None
    deadline = time.monotonic() + 3
    while (lease := await store.lease("sink", 1, ttl=5)) is None:
        assert time.monotonic() < deadline, "the crashed node's lease never expired"
        await asyncio.sleep(0.05)
    assert lease.token != crashed.token


async def test_leases_are_renewed_while_deliveries_run(store: Store) -> None:
    gate = UpstreamGate(store, Metrics(), lease_ttl=0.3)
    up = upstream(max_connections=1)
    assert secs(await gate.acquire(up)) == 0
    await asyncio.sleep(0.7)  # deliberately longer than the lease TTL: renewal must keep it
    assert secs(await gate.acquire(up)) > 0
    await gate.close()


async def test_minimum_interval(store: Store) -> None:
    gate = UpstreamGate(store, Metrics())
    up = upstream(min_interval=0.4)
    assert secs(await gate.acquire(up)) == 0
    wait = secs(await gate.acquire(up))
    assert 0.2 < wait <= 0.4
    await asyncio.sleep(wait)
    assert secs(await gate.acquire(up)) == 0


async def test_the_floor_leaves_a_receiver_room_for_its_own_jitter(store: Store) -> None:
    """`floor` spaces two MAIL commands by min_interval plus a margin of at least 10 ms: a
    receiver's clock, network and scheduling delay one arrival a few ms more than the next
    (CI saw 3.5 ms on loopback), and a provider's limit is hard. Each `floor` returns just
    before its MAIL is written, so the time between the returns is the gap as sent."""
    gate = UpstreamGate(store, Metrics())
    up = upstream(min_interval=0.3)
    await gate.floor(up)
    first = time.monotonic()
    await gate.floor(up)
    gap = time.monotonic() - first
    assert 0.31 <= gap < 0.5, gap


async def test_quota_is_exact_per_window_and_opens_again(store: Store) -> None:
    gate = UpstreamGate(store, Metrics())
    up = upstream(quotas=((3, 1),))
    started = time.monotonic()
    assert [secs(await gate.acquire(up)) for _ in range(3)] == [0, 0, 0]
    waits = [secs(await gate.acquire(up)) for _ in range(5)]
    assert all(0 < w <= 1.0 for w in waits)
    for _ in range(60):
        if secs(await gate.acquire(up)) == 0:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the quota never opened again")
    assert time.monotonic() - started >= 0.9  # the next window, not before


async def test_a_refused_quota_does_not_keep_a_lease(store: Store) -> None:
    gate = UpstreamGate(store, Metrics())
    up = upstream(max_connections=1, hourly=1)
    assert secs(await gate.acquire(up)) == 0
    await gate.release(up)
    assert secs(await gate.acquire(up)) > 60  # the hour's quota is used
    assert await store.leases("sink") == 0


async def test_slow_down_doubles_while_it_repeats_and_resets_on_success() -> None:
    now = [1000.0]
    store = MemoryStore()
    gate = UpstreamGate(
        store, Metrics(), slow_down_initial=10, slow_down_max=35, clock=lambda: now[0]
    )
    up = upstream()
    assert gate.slow_down(up) == 10
    now[0] += 3
    assert gate.slow_down(up) == 7  # a delivery that started before the pause: same episode
    now[0] += 7
    assert gate.slow_down(up) == 20
    now[0] += 20
    assert gate.slow_down(up) == 35  # capped
    now[0] += 35
    gate.recovered(up)
    assert gate.slow_down(up) == 10
    await asyncio.sleep(0)  # let the shared-pause task run
    assert await store.paused("sink") > 0  # published to the store: every node waits
    assert secs(await gate.acquire(up)) > 0
    await gate.close()


# -- losing Redis ---------------------------------------------------------------------------


async def test_redis_down_falls_back_to_scaled_local_limits_and_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    conf = LimitsConf(
        backend="redis", redis_url=redis_server.url, fallback_share=0.5, redis_retry=0.2
    )
    limits = Limits(conf, metrics)
    org = [applied("organisation", "acme", per_hour=4)]
    await limits.limiter.check_message(org, 1)
    redis_server.stop()
    caplog.set_level(logging.WARNING, logger="relay.limits")
    started = time.monotonic()
    await limits.limiter.check_message(org, 1)  # local: 2 of the scaled 4 * 0.5
    assert time.monotonic() - started < 1.5  # noticed fast
    await limits.limiter.check_message(org, 1)
    with pytest.raises(RateLimited) as info:
        await limits.limiter.check_message(org, 1)
    assert "organisation acme: 2 messages per hour exceeded" in info.value.reply()
    assert metrics.limits_degraded._value.get() == 1
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # logged once per transition
    # Upstream deliveries keep going on local limits too.
    assert secs(await limits.gate.acquire(upstream(max_connections=2))) == 0
    redis_server.start()
    await asyncio.sleep(0.25)  # past redis_retry: the next call tries Redis again
    await limits.limiter.check_message(org, 1)  # shared again: 2 of 4 used in Redis
    assert metrics.limits_degraded._value.get() == 0
    assert any("reachable again" in r.getMessage() for r in caplog.records)
    await limits.close()


async def test_a_stopped_redis_reaches_callers_as_backend_errors_only(
    redis_server: RedisServer,
) -> None:
    """Every operation of the Redis store fails as BackendError (its own scripts and calls)
    or StorageError (the `limits` library's windows), the errors Failover catches without
    importing redis-py; none of redis-py's own escapes."""
    store = RedisStore(redis_server.url, node_id="n1", timeout=0.3)
    await store.ping()
    redis_server.stop()
    w = Window("upstream x", 10, 3600, ("quota", "x", "3600"))
    calls = [
        store.ping(), store.lease("k", 2, 5.0), store.leases("k"), store.space("k", 1.0),
        store.pause("k", 1.0), store.paused_why("k"), store.used(w, fixed=True),
    ]
    for call in calls:
        with pytest.raises((BackendError, StorageError)) as info:
            await call
        assert not type(info.value).__module__.startswith("redis"), info.value
    await store.close()


async def test_redis_down_with_tempfail_refuses_intake_and_holds_deliveries(
    redis_server: RedisServer,
) -> None:
    conf = LimitsConf(
        backend="redis", redis_url=redis_server.url, on_backend_failure="tempfail", redis_retry=30
    )
    limits = Limits(conf, Metrics())
    org = [applied("organisation", "acme", per_hour=100)]
    await limits.limiter.check_message(org, 1)
    assert secs(await limits.gate.acquire(upstream())) == 0
    redis_server.stop()
    with pytest.raises(RateLimited) as info:
        await limits.limiter.check_message(org, 1)
    assert info.value.reply().startswith("451 4.7.1 rate limits temporarily unavailable")
    # Throttled upstreams wait (nothing bounced); one without throttles has nothing to count.
    assert secs(await limits.gate.acquire(upstream(hourly=100))) >= 1
    assert secs(await limits.gate.acquire(upstream())) == 0
    await limits.close()


async def test_fallback_scales_shared_limits() -> None:
    w = Window("upstream x", 10, 3600, ("quota", "x", "3600"))
    assert w.scaled(0.5).amount == 5
    assert w.scaled(0.01).amount == 1  # never zero: mail still flows, slowly
    assert isinstance(
        Limits(LimitsConf(backend="redis", redis_url="redis://127.0.0.1:1/0"), Metrics()).store,
        Failover,
    )


# -- relay route: current use ---------------------------------------------------------------


def _route(config_dir: Path, sender: str) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "route",
            "-c",
            str(config_dir),
            "--sender",
            sender,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


async def test_route_shows_current_use_from_redis_and_says_when_it_cannot(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    orgs = [{"org": "acme", "domains": ["acme.test"], "limits": {"per_hour": 10}}]
    upstreams = {
        "plain": {
            "host": "127.0.0.1",
            "port": 2525,
            "tls": "none",
            "allow_plaintext": True,
            "throttle": {"hourly": 50},
        }
    }
    limits_conf = {"backend": "redis", "redis_url": redis_server.url}
    shared = RelayConfig(
        tmp_path / "redis",
        upstreams=upstreams,
        default_upstream="plain",
        orgs=orgs,
        limits=limits_conf,
    ).write()
    local = RelayConfig(
        tmp_path / "memory", upstreams=upstreams, default_upstream="plain", orgs=orgs
    ).write()
    limits = Limits(LimitsConf(**limits_conf), Metrics())  # type: ignore[arg-type]
    for _ in range(3):
        await limits.limiter.check_message([applied("organisation", "acme", per_hour=10)], 1)
    assert secs(await limits.gate.acquire(upstream("plain", hourly=50))) == 0
    await limits.close()

    use = (await asyncio.to_thread(_route, shared, "bob@acme.test"))["current_use"]
    assert {"limit": "organisation acme: 10 messages per hour", "used": 3} in use["intake"]
    assert use["upstream"]["quotas"] == [{"limit": "50 messages per hour", "used": 1}]
    note = (await asyncio.to_thread(_route, local, "bob@acme.test"))["current_use"]["note"]
    assert "memory" in note and "not visible" in note
    # Once the relay has run, the memory backend's upstream counters are in spool/limits/.
    machine = MachineStore(local / "spool" / "limits")
    gate = UpstreamGate(machine, Metrics())
    assert await gate.acquire(upstream("plain", hourly=50)) is None
    await gate.close()
    await machine.close()
    use = (await asyncio.to_thread(_route, local, "bob@acme.test"))["current_use"]
    assert use["upstream"]["quotas"] == [{"limit": "50 messages per hour", "used": 1}]
    assert "not visible" in use["intake_note"]
