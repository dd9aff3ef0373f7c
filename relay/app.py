"""Composition root: config → objects, the event loop, signals, reload and graceful drain.

`relay serve` runs `serve()`. Every other module receives its collaborators here; nothing
else reaches for global state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from relay.auth import Users
from relay.auth import load_users as read_users
from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.config.secrets import SecretUnavailable, resolve_secret
from relay.delivery import Deliverer, DnsResolver
from relay.errors import SpoolError
from relay.events import MailLog, Metrics
from relay.intake import Intake
from relay.limits import Limits
from relay.limits.partition import Partition
from relay.listener import Listener, ListenerSettings
from relay.logsetup import configure as configure_logging
from relay.logsetup import remember_config_secrets
from relay.model import TlsMode
from relay.penalty import PenaltyBox
from relay.scheduler import Scheduler
from relay.spool import Spool
from relay.spool.shards import fold_surplus, shard_path
from relay.worker import WorkerSlot

if TYPE_CHECKING:
    from relay.admin import AdminServer

log = logging.getLogger("relay")


def listener_settings(config: Config) -> list[ListenerSettings]:
    out = []
    for lc in config.relay.listeners:
        def path(p: str | None) -> str | None:
            return None if p is None else str(p if Path(p).is_absolute() else config.base_dir / p)

        out.append(ListenerSettings(
            name=lc.name, address=lc.address, port=lc.port, tls=TlsMode(lc.tls),
            cert_file=path(lc.cert_file), key_file=path(lc.key_file), hostname=config.hostname,
            require_tls=lc.require_tls, require_auth=lc.require_auth,
            max_message_size=lc.max_message_size, max_recipients=lc.max_recipients,
            idle_timeout=lc.idle_timeout, session_timeout=lc.session_timeout, max_errors=lc.max_errors,
        ))
    return out


def load_users(config: Config) -> Users | None:
    f = config.relay.clients.users_file
    if not f:
        return None
    p = Path(f)
    return read_users(p if p.is_absolute() else config.base_dir / p)


def mail_log_path(config: Config) -> str:
    target = config.relay.log.mail_log
    if target == "-" or Path(target).is_absolute():
        return target
    return str(config.base_dir / target)


def admin_token(config: Config) -> str | None:
    """The admin API token, re-read from its reference (None: open endpoints only)."""
    ref = config.relay.admin.token
    if not ref:
        return None
    try:
        return resolve_secret(ref, base_dir=config.base_dir).reveal()
    except SecretUnavailable:
        return None  # `relay check` warned; the API then fails closed (403)


def sd_notify(message: str) -> None:
    """systemd readiness protocol (sd_notify(3)) without libsystemd: one datagram."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


class Relay:
    """One running relay node."""

    def __init__(self, config: Config, location: str | None, slot: WorkerSlot | None = None) -> None:
        self.config = config
        self.location = location
        self.slot = slot  # None: the only process; else one of the supervisor's workers
        self.metrics = Metrics()
        self.events = MailLog(mail_log_path(config), self.metrics)
        self.listeners: list[Listener] = []
        self.stopping = asyncio.Event()
        self.ready = False  # /readyz: listeners bound and accepting
        self.admin: AdminServer | None = None
        self.reload_errors: list[str] = []  # of the last refused reload (`relay reload` shows them)
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        cfg = self.config
        slot = self.slot
        spool_path = shard_path(cfg.spool_path, slot.index) if slot else cfg.spool_path
        self.spool = await Spool.open(spool_path)
        self.limits = Limits.from_config(cfg, self.metrics, self._partition())
        self.deliverer = Deliverer(
            DnsResolver(cfg.relay.dns.hosts, lifetime=cfg.relay.dns.timeout),
            unpooled=lambda up: self.limits.store.fresh_connections(up.throttle.max_connections),
        )
        self.scheduler = Scheduler(cfg, self.spool, self.deliverer, self.events, gate=self.limits.gate)
        loaded = await self.scheduler.recover()
        queued, held = await self.spool.count()
        log.info("recovered %d unfinished messages from %s (%d held; %d loaded, the rest are read "
                 "in due order as room frees)", queued, spool_path, held, loaded)
        self.penalty = PenaltyBox()  # failed-AUTH memory; survives reloads, not restarts
        self.intake = Intake(cfg, self.spool, self.scheduler, self.events, users=load_users(cfg),
                             penalty=self.penalty, limiter=self.limits.limiter)
        self.scheduler.start()
        await self._start_admin(cfg)
        for settings in listener_settings(cfg):
            lst = Listener(settings, self.intake, logger=logging.getLogger(f"relay.listener.{settings.name}"))
            await lst.start(sock=slot.listening_socket(settings.name) if slot else None)
            self.listeners.append(lst)
            if slot is None:  # with workers, the supervisor prints it once for all
                # Tests and operators wait for this exact line.
                print(f"relay: listening {settings.name} {settings.address}:{lst.port} tls={settings.tls.value}",
                      file=sys.stderr, flush=True)
        self.ready = True
        if slot is None:
            sd_notify("READY=1\nSTATUS=accepting mail")
        else:
            slot.notify_ready()

    def _partition(self) -> Partition | None:
        if self.slot is None or self.slot.count <= 1:
            return None
        # Minimum intervals are shared through files next to the shards (partition.py).
        return Partition(self.slot.index, self.slot.count, self.config.spool_path / "limits")

    async def _start_admin(self, cfg: Config) -> None:
        a = cfg.relay.admin
        from relay.admin import AdminServer

        if self.slot is not None:
            # A worker's API is for its supervisor only, which serves the real one.
            if self.slot.admin_socket:
                self.admin = AdminServer(self, a.address, 0, admin_token(cfg),
                                         unix_path=self.slot.admin_socket)
                await self.admin.start()
            return
        if not a.enabled:
            return
        self.admin = AdminServer(self, a.address, a.port, admin_token(cfg))
        await self.admin.start()
        # Like the listening lines: tests and operators read the bound port here.
        print(f"relay: admin API http://{a.address}:{self.admin.port}", file=sys.stderr, flush=True)

    async def reload(self) -> bool:
        """SIGHUP: the new config replaces the old only if it validates; secrets are re-read."""
        async with self._reload_lock:  # SIGHUP and POST /reload may arrive together
            return await self._reload()

    async def _reload(self) -> bool:
        try:
            new = await asyncio.to_thread(load_config, self.location)
        except ConfigErrors as exc:
            self.reload_errors = [str(e) for e in exc.errors]
            for e in exc.errors:
                log.error("reload refused, old configuration keeps running: %s", e)
            return False
        self.reload_errors = []
        if self.admin is not None:
            self.admin.api.set_token(admin_token(new))
            if (new.relay.admin.address, new.relay.admin.port) != (
                self.config.relay.admin.address, self.config.relay.admin.port
            ):
                log.warning("admin API address changes take effect at the next restart")
        remember_config_secrets(new, [t for t in [admin_token(new)] if t])
        for w in new.warnings:
            log.warning("%s", w)
        self.config = new
        self.scheduler.reconfigure(new)
        await self._reload_limits(new)
        self.intake = Intake(new, self.spool, self.scheduler, self.events, users=load_users(new),
                             penalty=self.penalty, limiter=self.limits.limiter)
        for lst in self.listeners:
            lst.set_intake(self.intake)
        log.info("configuration reloaded")
        return True

    async def _reload_limits(self, new: Config) -> None:
        """Same limits backend: keep counters and leases, take the new values. A new backend
        (e.g. memory → Redis): new limits from now on; the old ones are closed."""
        if self.limits.same_backend(new.relay.limits):
            self.limits.reconfigure(new.relay.limits)
            return
        old, self.limits = self.limits, Limits.from_config(new, self.metrics, self._partition())
        self.scheduler.gate = self.limits.gate
        await old.close()

    async def stop(self, grace: float = 30.0) -> None:
        self.ready = False
        if self.slot is None:
            sd_notify("STOPPING=1")
        await asyncio.gather(*(lst.stop(grace) for lst in self.listeners))
        await self.scheduler.stop(grace=min(grace, 10.0))
        if self.admin is not None:
            await self.admin.stop()
        await self.limits.close()
        await self.deliverer.close()
        await self.spool.close()
        self.events.close()


async def run(location: str | None, slot: WorkerSlot | None = None) -> int:
    try:
        config = load_config(location)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 2
    # One JSON object per line (or text), AUTH arguments and known secrets redacted.
    configure_logging(config.relay.log.level, config.relay.log.format)
    remember_config_secrets(config, [t for t in [admin_token(config)] if t])
    if slot is None:
        for w in config.warnings:  # a worker's supervisor has said them already
            log.warning("%s", w)
        if config.workers > 1:
            from relay.supervisor import supervise

            return await supervise(config, location)
        try:  # the last run had more workers: their shards' mail is ours now
            await asyncio.to_thread(fold_surplus, config.spool_path, 1)
        except (OSError, SpoolError) as exc:
            log.error("cannot start: %s", getattr(exc, "reason", exc))
            return 1
    relay = Relay(config, location, slot)
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
    except SpoolError as exc:
        # e.g. a read-only or missing spool: never listen without a place to keep mail.
        log.error("cannot start: %s", exc.reason)
        return 1
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
