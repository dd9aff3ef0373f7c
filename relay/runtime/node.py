"""One relay node, the composition root: config → objects (spool, limits, deliverer,
scheduler, intake, listeners, admin API), reload and graceful stop.

A node is the only process (`workers: 1`) or one of the supervisor's workers (then with a
`WorkerSlot`: its spool shard, inherited sockets, private admin socket). Every other module
receives its collaborators here; nothing else reaches for global state.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from relay.bounce.notifier import Bouncer
from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.delivery import Deliverer, DnsResolver
from relay.events import MailLog, Metrics
from relay.intake import Intake
from relay.limits import Limits
from relay.limits.partition import Partition
from relay.ops.admin import AdminServer
from relay.runtime.logsetup import remember_config_secrets
from relay.runtime.settings import admin_token, listener_settings, load_users, mail_log_path
from relay.runtime.slot import WorkerSlot
from relay.runtime.systemd import sd_notify
from relay.scheduler import Scheduler
from relay.smtp.penalty import PenaltyBox
from relay.smtp.server import Listener
from relay.spool import Spool
from relay.spool.shards import shard_path

log = logging.getLogger("relay")


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
            before_mail=lambda up: self.limits.gate.floor(up),
        )
        self.limits.gate.trim = self.deliverer.trim
        self.scheduler = Scheduler(
            cfg, self.spool, self.deliverer, self.events,
            bounces=Bouncer(self.spool, self.events, clock=time.time), gate=self.limits.gate,
        )
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
        # Upstream limits are shared through spool/limits/ (relay/limits/machine.py).
        return Partition(self.slot.index, self.slot.count)

    def listening(self) -> dict[str, int]:
        """Listener name -> bound port (the admin API's /readyz)."""
        return {lst.settings.name: lst.port for lst in self.listeners}

    async def _start_admin(self, cfg: Config) -> None:
        a = cfg.relay.admin
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
        self.limits.gate.trim = self.deliverer.trim
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


