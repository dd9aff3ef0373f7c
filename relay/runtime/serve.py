"""`relay serve`: load the configuration, then run one relay node (or, with `workers: N`, the
supervisor), with signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from relay import __version__ as relay_version
from relay.config import ConfigErrors
from relay.core.errors import SpoolError
from relay.runtime import build
from relay.runtime.logsetup import configure as configure_logging
from relay.runtime.logsetup import remember_config_secrets
from relay.runtime.node import Relay
from relay.runtime.settings import admin_token
from relay.runtime.slot import WorkerSlot
from relay.runtime.startup import StartError, load_checked
from relay.runtime.supervisor import supervise
from relay.spool.shards import fold_surplus

log = logging.getLogger("relay")

# Allocations of container objects between two collections of the youngest generation
# (Python's default is 700). See settle_gc.
GC_YOUNG = 20_000


def settle_gc() -> None:
    """Once the node has started: what start-up built (modules, the configuration, the
    recovered queue) leaves the cyclic collector's sight (`gc.freeze`), and the youngest
    generation is collected every GC_YOUNG allocations instead of 700. Every full
    collection had walked all of it again, a young one ran every ~2 messages; 5 KB, 2
    workers: -1 to -4% CPU per message (benchmarks/RESULTS.md §15). Frozen objects are
    still freed by reference counting; only a reference cycle among them, once dropped,
    stays until exit. Objects made later (a reload's) are collected as usual."""
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_YOUNG), gen1, gen2)
    log.debug("gc: %d objects frozen after start-up; the youngest generation is collected"
              " every %d allocations", gc.get_freeze_count(), gc.get_threshold()[0])


async def run(location: str | None, slot: WorkerSlot | None = None) -> int:
    try:
        config, _users = load_checked(location)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 2
    # One JSON object per line (or text), AUTH arguments and known secrets redacted.
    configure_logging(config.relay.log.level, config.relay.log.format)
    remember_config_secrets(config, [t for t in [admin_token(config)] if t])
    if slot is None:
        log.info("egress-relay %s, %s", relay_version, build.describe())
        for w in config.warnings:  # a worker's supervisor has said them already
            log.warning("%s", w)
        if config.workers > 1:
            return await supervise(config, location)
        try:  # the last run had more workers: their shards' mail is ours now
            await asyncio.to_thread(fold_surplus, config.spool_path, 1)
        except (OSError, SpoolError) as exc:
            log.error("cannot start: %s", getattr(exc, "reason", exc))
            return 1
    try:
        relay = Relay(config, location, slot)
    except OSError as exc:  # the mail log cannot be opened
        log.error("cannot start: %s", exc.strerror or exc)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        t = loop.create_task(relay.reload())
        reloads.add(t)
        t.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await relay.start()
    except (SpoolError, StartError) as exc:
        # e.g. a read-only or missing spool: never listen without a place to keep mail; a
        # port in use. One line, no traceback; what did start is stopped again.
        log.error("cannot start: %s", exc.reason if isinstance(exc, SpoolError) else exc)
        await relay.stop(grace=0)
        return 1
    settle_gc()
    await stop.wait()
    log.info("stopping: no new connections, finishing transactions in progress")
    await relay.stop()
    log.info("stopped")
    return 0


def serve(location: str | None, slot: WorkerSlot | None = None) -> int:
    try:
        import uvloop

        return uvloop.run(run(location, slot))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run(location, slot))
