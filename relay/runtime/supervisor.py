"""`relay serve` with `workers: N > 1`: bind once, run N worker processes, keep them running.

One event loop uses one core; the relay's work (SMTP parsing, TLS, policy, delivery) is CPU
bound, so a machine with N cores runs N workers. The supervisor:

1. takes `supervisor.lock` in the spool directory (one supervisor per spool), folds the
   shards of workers that no longer exist into shard 0 (relay/spool/shards.py);
2. binds every listener's socket itself, so the port stays open while a worker restarts
   and a connection waiting in the accept queue is served by whichever worker is free;
3. starts `relay serve --worker I/N` N times; each inherits the sockets and runs an
   ordinary relay on its own spool shard with its own scheduler and deliverer (limits
   are shared between workers through spool/limits/, relay/limits/machine.py, or Redis);
4. once every worker has written "ready" on its pipe, prints the `relay: listening …`
   lines, serves the admin API for all of them (relay/runtime/fanout.py) and tells systemd;
5. restarts a worker that dies (backoff 1 s doubling to 30 s; its shard's mail waits in
   its spool meanwhile, nothing is lost), forwards SIGHUP (after validating the new
   configuration) and, on SIGTERM/SIGINT, stops every worker the graceful way and waits.

A worker that cannot start at all (e.g. its shard is damaged beyond use) fails the start:
the supervisor stops the others and exits 1, like a single process that cannot open its
spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.core.errors import SpoolError
from relay.runtime.fanout import Fanout, FanoutApi, FanoutServer
from relay.runtime.settings import admin_token, listener_settings
from relay.runtime.startup import StartError, cannot_listen, load_checked
from relay.runtime.systemd import sd_notify
from relay.spool.shards import fold_surplus
from relay.spool.store import lock_file

log = logging.getLogger("relay.supervisor")

START_TIMEOUT = 300.0  # recovering a large shard takes seconds (200,000 messages: ~5 s)
STOP_TIMEOUT = 50.0  # a worker's graceful stop: listeners 30 s + scheduler 10 s + margin,
# inside systemd's TimeoutStopSec=60
RESTART_MIN, RESTART_MAX = 1.0, 30.0
STABLE_AFTER = 60.0  # a worker that ran this long restarts with the shortest backoff again
BACKLOG = 1024
LOCK_NAME = "supervisor.lock"


def lock_supervisor(root: Path) -> int:
    """One supervisor per spool; the pid inside lets `relay reload` signal it."""
    root.mkdir(parents=True, exist_ok=True)
    return lock_file(root / LOCK_NAME, f"spool {root} is in use by another relay")


def running_supervisor(root: Path) -> int | None:
    """The pid of the supervisor serving spool `root`, if one holds its lock."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a supervisor is running
            return int(os.read(fd, 32).split()[0])
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except (ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        self.ready: asyncio.Future[bool] | None = None


class Supervisor:
    def __init__(self, config: Config, location: str | None) -> None:
        self.config = config
        self.location = location
        self.count = config.workers
        self.root = config.spool_path
        self.sockets: dict[str, socket.socket] = {}
        self.rundir = Path(tempfile.mkdtemp(prefix="relay-"))  # the workers' API sockets
        self.workers = [Worker(i) for i in range(self.count)]
        self.stopping = asyncio.Event()
        self.admin: FanoutServer | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    def socket_path(self, index: int) -> str:
        return str(self.rundir / f"w{index}.sock")

    # -- workers ----------------------------------------------------------------------------
    async def spawn(self, w: Worker) -> None:
        loop = asyncio.get_running_loop()
        r, wfd = os.pipe()
        args = [sys.executable, "-m", "relay.cli", "serve"]
        if self.location is not None:
            args += ["-c", self.location]
        args += [
            "--worker", f"{w.index}/{self.count}",
            "--listen-fds", ",".join(f"{n}={s.fileno()}" for n, s in self.sockets.items()),
            "--ready-fd", str(wfd),
            "--admin-socket", self.socket_path(w.index),
        ]
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)  # only the supervisor talks to systemd
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *args, pass_fds=(*(s.fileno() for s in self.sockets.values()), wfd),
                env=env, stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(wfd)
        w.started = time.monotonic()
        ready: asyncio.Future[bool] = loop.create_future()
        w.ready = ready

        def readable() -> None:  # "ready\n", or EOF when the worker died first
            try:
                data = os.read(r, 64)
            except BlockingIOError:
                return
            loop.remove_reader(r)
            os.close(r)
            if not ready.done():
                ready.set_result(data.startswith(b"ready"))

        os.set_blocking(r, False)
        loop.add_reader(r, readable)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)

    async def keep(self, w: Worker) -> None:
        """Restart `w` whenever it exits, until the supervisor stops."""
        backoff = RESTART_MIN
        while True:
            assert w.proc is not None
            rc = await w.proc.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - w.started > STABLE_AFTER:
                backoff = RESTART_MIN
            log.error(
                "worker %d (pid %d) exited with status %s; restarting it in %.0f s"
                " (its queued mail waits in its spool shard)",
                w.index, w.proc.pid, rc, backoff,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
                return
            backoff = min(backoff * 2, RESTART_MAX)
            while not self.stopping.is_set():
                try:
                    await self.spawn(w)
                    break
                except OSError as exc:  # e.g. out of processes or file descriptors
                    log.error("cannot start worker %d: %s; trying again in %.0f s",
                              w.index, exc, backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), backoff)
                    backoff = min(backoff * 2, RESTART_MAX)
            if self.stopping.is_set():
                return

    def signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def wait_all(self, limit: float) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), limit)
        except TimeoutError:
            log.error("workers still running %.0f s after SIGTERM; killing them", limit)
            self.signal_all(signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in procs))

    # -- reload -----------------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: validate here, then let every worker reload (each re-reads the files)."""
        try:
            new, _users = await asyncio.to_thread(load_checked, self.location)
        except ConfigErrors as exc:
            for e in exc.errors:
                log.error("reload refused, old configuration keeps running: %s", e)
            return
        self.adopt(new)
        self.signal_all(signal.SIGHUP)

    def adopt(self, new: Config) -> None:
        if new.workers != self.count:
            log.warning("workers: %d → %d takes effect at the next restart", self.count, new.workers)
        if self.admin is not None:
            a, old = new.relay.admin, self.config.relay.admin
            if (a.address, a.port) != (old.address, old.port):
                log.warning("admin API address changes take effect at the next restart")
        self.config = new

    def reloaded_via_api(self) -> None:
        try:
            self.adopt(load_config(self.location))
        except ConfigErrors:  # the workers accepted it a moment ago; a race with an edit
            pass

    # -- the whole life ---------------------------------------------------------------------
    async def run(self) -> int:
        try:
            lock = lock_supervisor(self.root)
        except (SpoolError, OSError) as exc:
            log.error("cannot start: %s", getattr(exc, "reason", exc))
            return 1
        try:
            return await self._run()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)
            os.close(lock)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            t = loop.create_task(self.reload())
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

        # Before anything starts: a signal during start-up must not kill the supervisor
        # and leave its workers behind.
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            moved = await asyncio.to_thread(fold_surplus, self.root, self.count)
            if moved:
                log.info("moved %d message(s) from surplus spool shards", moved)
            for s in listener_settings(self.config):
                try:
                    self.sockets[s.name] = bind(s.address, s.port)
                except OSError as exc:
                    raise cannot_listen(f"listener {s.name}", s.address, s.port, exc) from None
        except (SpoolError, OSError, StartError) as exc:
            log.error("cannot start: %s", getattr(exc, "reason", exc))
            return 1
        try:
            for w in self.workers:
                await self.spawn(w)
            if not await self._all_ready():
                self.signal_all(signal.SIGTERM)
                await self.wait_all(STOP_TIMEOUT)
                return 1
            for w in self.workers:
                t = loop.create_task(self.keep(w))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)
            await self._start_admin()
            for s in listener_settings(self.config):
                port = self.sockets[s.name].getsockname()[1]
                print(f"relay: listening {s.name} {s.address}:{port} tls={s.tls.value}",
                      file=sys.stderr, flush=True)
            log.info("%d workers accepting mail", self.count)
            sd_notify(f"READY=1\nSTATUS=accepting mail ({self.count} workers)")
            await self.stopping.wait()
            log.info("stopping: every worker finishes its transactions in progress")
            sd_notify("STOPPING=1")
            self.signal_all(signal.SIGTERM)
            await self.wait_all(STOP_TIMEOUT)
            log.info("stopped")
            return 0
        finally:
            self.stopping.set()
            if self.admin is not None:
                await self.admin.stop()
            for sock in self.sockets.values():
                sock.close()

    async def _all_ready(self) -> bool:
        waits = {w.index: w.ready for w in self.workers if w.ready is not None}
        gathered: asyncio.Future[list[bool]] = asyncio.ensure_future(
            asyncio.gather(*waits.values())
        )
        stopped = asyncio.ensure_future(self.stopping.wait())
        pending: set[asyncio.Future[Any]] = {gathered, stopped}
        await asyncio.wait(pending, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not gathered.done():
            gathered.cancel()
            if not self.stopping.is_set():
                log.error("workers not ready after %.0f s", START_TIMEOUT)
            return False
        results = gathered.result()
        failed = [i for i, ok in zip(waits, results, strict=True) if not ok]
        if failed:
            log.error("cannot start: worker(s) %s failed to start (see their log lines)",
                      ", ".join(map(str, failed)))
            return False
        return True

    async def _start_admin(self) -> None:
        a = self.config.relay.admin
        if not a.enabled:
            return
        api = FanoutApi(
            Fanout([self.socket_path(i) for i in range(self.count)]),
            listeners=lambda: {n: s.getsockname()[1] for n, s in self.sockets.items()},
            on_reloaded=self.reloaded_via_api,
        )
        self.admin = FanoutServer(api, a.address, a.port)
        await self.admin.start()
        print(f"relay: admin API http://{a.address}:{self.admin.port}", file=sys.stderr, flush=True)
        if admin_token(self.config) is None:
            log.info("admin API without a token: only /healthz, /readyz and /metrics answer")


async def supervise(config: Config, location: str | None) -> int:
    return await Supervisor(config, location).run()
