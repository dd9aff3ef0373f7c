"""The memory backend's machine store (relay/limits/machine.py): upstream limits shared by
the worker processes of one machine through spool/limits/limits.db, and kept across
restarts. Two stores on one directory stand for two workers; reopening one stands for a
restart. The real thing, with `relay serve` and two workers, is in test_exact_limits.py."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from relay.core.model import TlsMode, Upstream
from relay.core.waits import SLOW_DOWN
from relay.events import Metrics
from relay.limits.gate import UpstreamGate
from relay.limits.machine import IDLE_GRACE, PAUSES_FRESH, MachineStore, open_db
from relay.limits.partition import Partition
from relay.limits.store import Window
from tests.together import failures_together

HOURLY = Window("upstream up", 4, 3600, ("quota", "up", "3600"))


def test_a_quota_is_exact_across_workers_and_survives_a_restart(tmp_path: Path) -> None:
    async def go() -> None:
        w0 = MachineStore(tmp_path, Partition(0, 2))
        w1 = MachineStore(tmp_path, Partition(1, 2))
        # All mail in one worker: it gets the whole quota, not half of it.
        assert [await w0.consume([HOURLY], fixed=True) for _ in range(4)] == [None] * 4
        full = await w1.consume([HOURLY], fixed=True)
        assert full is not None and full[0] == HOURLY and 3500 < full[1] <= 3600
        await w0.close()
        await w1.close()
        again = MachineStore(tmp_path, Partition(0, 2))  # restarted: the same window
        assert await again.consume([HOURLY], fixed=True) is not None
        assert await again.used(HOURLY, fixed=True) == 4
        await again.close()

    asyncio.run(go())


def test_intake_windows_stay_split_between_workers(tmp_path: Path) -> None:
    async def go() -> None:
        w1 = MachineStore(tmp_path, Partition(1, 2))
        per_min = Window("organisation acme", 5, 60, ("org", "acme"))
        got = [await w1.consume([per_min], fixed=False) for _ in range(3)]
        assert got[:2] == [None, None] and got[2] is not None and got[2][0] == per_min
        await w1.close()

    asyncio.run(go())


def test_connections_go_where_the_mail_is_and_come_back_when_others_wait(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        w0 = MachineStore(tmp_path, Partition(0, 2))
        w1 = MachineStore(tmp_path, Partition(1, 2))
        leases = [await w0.lease("up", 4, 30.0) for _ in range(4)]
        assert all(x is not None for x in leases)  # one worker may hold every slot
        assert await w1.lease("up", 4, 30.0) is None  # ... and the other waits for one
        assert await w0.leases("up") == 4
        # w0 finishes two deliveries: their connections stay pooled, holding slots, until
        # it sees the waiter; then it keeps its fair share (4 over 2 workers) while busy.
        for lease in leases[:3]:
            assert lease is not None
            await w0.unlease(lease)
        assert w0.holding("up") == (4, 1)
        assert w0.take_surplus("up", force=True) == 2
        assert w0.holding("up") == (2, 1)
        w0.give_back("up")
        # First come, first served: w0 cannot take them back while w1 waits.
        assert await w0.lease("up", 4, 30.0) is not None  # an idle slot it still holds
        assert await w0.lease("up", 4, 30.0) is None
        assert await w1.lease("up", 4, 30.0) is not None
        assert await w1.lease("up", 4, 30.0) is not None
        assert await w1.lease("up", 4, 30.0) is None
        assert await w0.leases("up") == 4
        # A worker whose queue just emptied keeps its fair share a moment (mail comes in
        # bursts: handing connections over and opening new ones would churn); one with
        # nothing to deliver for IDLE_GRACE gives every idle slot to a waiter.
        for _ in range(2):
            await w0.unlease(leases[3])  # type: ignore[arg-type]
        assert w0.holding("up") == (2, 0)
        assert w0.take_surplus("up", force=True) == 0
        await asyncio.sleep(IDLE_GRACE)
        assert await w1.lease("up", 4, 30.0) is None  # still waiting
        assert w0.take_surplus("up", force=True) == 2
        w0.give_back("up")
        assert await w1.lease("up", 4, 30.0) is not None
        await w0.close()
        await w1.close()

    asyncio.run(go())


def test_a_dead_workers_connections_are_reclaimed(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)

    async def go() -> None:
        w1 = MachineStore(tmp_path, Partition(1, 2))
        w1.db.execute("INSERT INTO slots VALUES ('up', 0, ?, 2, 0, 0)", (int(gone.stdout),))
        assert await w1.lease("up", 2, 30.0) is not None  # worker 0's process is gone
        assert await w1.lease("up", 2, 30.0) is not None
        assert await w1.leases("up") == 2
        # A restarted worker 0 starts with nothing held.
        w0 = MachineStore(tmp_path, Partition(0, 2))
        assert await w0.leases("up") == 2
        await w0.close()
        await w1.close()

    asyncio.run(go())


def test_a_pause_is_shared_and_survives_a_restart_with_its_reason(tmp_path: Path) -> None:
    async def go() -> None:
        w0 = MachineStore(tmp_path, Partition(0, 2))
        w1 = MachineStore(tmp_path, Partition(1, 2))
        await w0.pause("up", 30.0, "slow-down after: 421 4.7.0 slow down")
        await w0.pause("up", 5.0, "shorter")  # never shortens, keeps the reason
        left, why = await w1.paused_why("up")
        assert 29 < left <= 30 and why == "slow-down after: 421 4.7.0 slow down"
        await w0.close()
        await w1.close()
        again = MachineStore(tmp_path)
        assert 28 < await again.paused("up") <= 30
        await again.close()

    asyncio.run(go())


def test_another_workers_pause_is_seen_within_pauses_fresh(tmp_path: Path) -> None:
    # Every delivery asks whether its upstream is paused; a worker reads the pauses at most
    # every PAUSES_FRESH seconds (issue 17), its own at once, another's within that time.
    async def go() -> None:
        w0 = MachineStore(tmp_path, Partition(0, 2))
        w1 = MachineStore(tmp_path, Partition(1, 2))
        assert await w1.paused_why("up") == (0.0, "")  # w1 has read: nothing paused
        await w0.pause("up", 30.0, "slow-down after: 421 4.7.0 slow down")
        assert 29 < await w0.paused("up") <= 30  # its own: at once
        started = time.monotonic()
        while await w1.paused("up") == 0.0:
            assert time.monotonic() - started < PAUSES_FRESH + 0.5
            await asyncio.sleep(0.01)
        assert time.monotonic() - started > 0.05  # from its last reading, not a query each
        left, why = await w1.paused_why("up")
        assert 29 < left <= 30 and why.startswith("slow-down after: 421")
        await w0.close()
        await w1.close()

    asyncio.run(go())


def test_minimum_interval_is_shared_and_a_stamp_from_another_boot_is_ignored(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        w0 = MachineStore(tmp_path, Partition(0, 2))
        w1 = MachineStore(tmp_path, Partition(1, 2))
        assert await w0.space("up", 1.0) == 0.0
        assert 0.5 < await w1.space("up", 1.0) <= 1.0
        w0.db.execute("UPDATE spacing SET next = ?", (time.monotonic() + 3600.0,))
        assert await w1.space("up", 1.0) == 0.0  # far beyond the interval: not this boot's
        await w0.close()
        await w1.close()

    asyncio.run(go())


def test_a_slow_down_pause_outlives_a_restart_and_says_why(tmp_path: Path) -> None:
    up = Upstream("up", "mx.test", 25, TlsMode.NONE, "default")

    async def go() -> None:
        store = MachineStore(tmp_path)
        gate = UpstreamGate(store, Metrics(), slow_down_initial=60.0)
        assert gate.slow_down(up, "slow-down after: 421 4.7.0 too fast") == 60.0
        await gate.close()  # the pause is written before the gate lets go
        await store.close()
        again = MachineStore(tmp_path)
        wait = await UpstreamGate(again, Metrics()).acquire(up)
        assert wait is not None and wait.kind == SLOW_DOWN and 58 < wait.seconds <= 60
        assert wait.reason.startswith("upstream paused until ")
        assert wait.reason.endswith("(slow-down after: 421 4.7.0 too fast)")
        await again.close()

    asyncio.run(go())


def test_workers_opening_a_new_limits_store_together_never_see_database_locked(
    tmp_path: Path,
) -> None:
    # Found in a full run: `workers: 2` starting on a fresh spool, worker 0 failed to start
    # with "database is locked" switching the new limits.db to WAL (SQLite does not wait for
    # that switch). 8 processes x 25 fresh directories, all opening at once (without
    # the lock: failed every run on a quiet machine, 5 runs in 6 with a load test beside it).
    dirs = [str(tmp_path / f"l{i}") for i in range(25)]
    assert failures_together(lambda d: open_db(Path(d)).close(), dirs) == 0
