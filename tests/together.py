"""Several processes doing the same thing at the same instant (workers starting together)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any


def _at_barrier(target: Callable[[str], object], arg: str, barrier: Any) -> None:
    barrier.wait()
    target(arg)


def failures_together(target: Callable[[str], object], args: list[str], processes: int = 8) -> int:
    """Run `target(arg)` in `processes` forked processes released together, for each arg in
    turn; how many of those processes failed (exit code not 0)."""
    ctx = multiprocessing.get_context("fork")
    failed = 0
    for arg in args:
        barrier = ctx.Barrier(processes)
        procs = [ctx.Process(target=_at_barrier, args=(target, arg, barrier))
                 for _ in range(processes)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        failed += sum(p.exitcode != 0 for p in procs)
    return failed
