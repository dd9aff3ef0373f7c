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
from relay.config import ConfigErrors
from relay.config.model import Config
from relay.delivery import Deliverer, DnsResolver
from relay.events import MailLog, Metrics
from relay.intake import Intake
from relay.limits import Limits
from relay.limits.partition import Partition
from relay.notify.suppression import AutoSuppressor, SuppressionList
from relay.notify.webhook import WebhookSender
from relay.ops.admin import AdminServer
from relay.policy.dsnroute import dsn_upstream_id
from relay.runtime.logsetup import remember_config_secrets
from relay.runtime.settings import admin_token, listener_settings, mail_log_path, token_broker
from relay.runtime.slot import WorkerSlot
from relay.runtime.startup import StartError, cannot_listen, checked_users, load_checked
from relay.runtime.systemd import sd_notify
from relay.scheduler import Scheduler
from relay.smtp.penalty import PenaltyBox
from relay.smtp.server import Listener
from relay.spool import Spool
from relay.spool.shards import shard_path
from relay.spool.verification import VerificationStore

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
        self.spool = await Spool.open(spool_path, commit_gather=cfg.relay.spool.commit_gather)
        self.limits = Limits.from_config(cfg, self.metrics, self._partition())
        self.tokens = token_broker(cfg)
        self.deliverer = Deliverer(
            DnsResolver(cfg.relay.dns.hosts, lifetime=cfg.relay.dns.timeout),
            unpooled=lambda up: self.limits.store.fresh_connections(up.throttle.max_connections),
            tokens=self.tokens,
            before_mail=lambda up: self.limits.gate.floor(up),
        )
        self.limits.gate.trim = self.deliverer.trim
        self.scheduler = Scheduler(
            cfg, self.spool, self.deliverer, self.events,
            bounces=Bouncer(self.spool, self.events, clock=time.time,
                            dsn_upstream=lambda org: dsn_upstream_id(self.config, org)),
            gate=self.limits.gate,
        )
        self.scheduler.verification = VerificationStore(cfg.spool_path / "upstreams")
        await self._start_notify(cfg)
        loaded = await self.scheduler.recover()
        queued, held = await self.spool.count()
        log.info("recovered %d unfinished messages from %s (%d held; %d loaded, the rest are read "
                 "in due order as room frees)", queued, spool_path, held, loaded)
        self.penalty = PenaltyBox()  # failed-AUTH memory; survives reloads, not restarts
        try:
            users = checked_users(cfg)
        except ConfigErrors as exc:  # changed since the configuration was checked
            raise StartError("; ".join(str(e) for e in exc.errors)) from None
        self.intake = Intake(cfg, self.spool, self.scheduler, self.events, users=users,
                             penalty=self.penalty, limiter=self.limits.limiter,
                             suppression=self.suppression)
        self.scheduler.start()
        await self._start_admin(cfg)
        for settings in listener_settings(cfg):
            lst = Listener(settings, self.intake, logger=logging.getLogger(f"relay.listener.{settings.name}"))
            try:
                await lst.start(sock=slot.listening_socket(settings.name) if slot else None)
            except OSError as exc:  # a port in use, a certificate gone since the check
                raise cannot_listen(f"listener {settings.name}", settings.address,
                                    settings.port, exc) from None
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

    async def _start_notify(self, cfg: Config) -> None:
        """Suppression list (node-wide, shared with Redis) and this shard's webhook sender."""
        lc = cfg.relay.limits
        self.suppression = SuppressionList(
            cfg.spool_path, redis_url=lc.redis_url if lc.backend == "redis" else None,
            redis_timeout=lc.redis_timeout)
        await self.suppression.start()
        self.scheduler.recorder.suppressor = AutoSuppressor(
            self.suppression,
            lambda org: o.suppression if (o := self.config.orgs.get(org)) else None)
        node = lc.node_id or cfg.hostname
        self.webhooks = WebhookSender(self.spool, self.metrics.registry,
                                      f"{node}/w{self.slot.index if self.slot else 0}", cfg)
        await self.webhooks.start()

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
        try:
            await self.admin.start()
        except OSError as exc:
            raise cannot_listen("admin API", a.address, a.port, exc) from None
        # Like the listening lines: tests and operators read the bound port here.
        print(f"relay: admin API http://{a.address}:{self.admin.port}", file=sys.stderr, flush=True)
        if admin_token(cfg) is None:  # `relay check` warns only when admin: is written
            log.info("admin API without a token: only /healthz, /readyz and /metrics answer")

    async def reload(self) -> bool:
        """SIGHUP: the new config replaces the old only if it validates; secrets are re-read."""
        async with self._reload_lock:  # SIGHUP and POST /reload may arrive together
            return await self._reload()

    async def _reload(self) -> bool:
        # Everything the new configuration needs is read and checked before anything of the
        # running one is replaced: config, policies, the files it names, the users file.
        try:
            new, users = await asyncio.to_thread(load_checked, self.location)
        except ConfigErrors as exc:
            self.reload_errors = [str(e) for e in exc.errors]
            for e in exc.errors:
                log.error("reload refused, old configuration keeps running: %s", e)
            return False
        except Exception as exc:  # a bug must not leave a half-reloaded relay or a traceback
            self.reload_errors = [f"unexpected error: {exc!r}"]
            log.error("reload refused, old configuration keeps running: unexpected error %r", exc)
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
        await self.webhooks.reconfigure(new)
        self.intake = Intake(new, self.spool, self.scheduler, self.events, users=users,
                             penalty=self.penalty, limiter=self.limits.limiter,
                             suppression=self.suppression)
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
        """Stop what runs; also after a start that failed half-way (StartError)."""
        was_ready, self.ready = self.ready, False
        if self.slot is None and was_ready:  # a failed start never said READY either
            sd_notify("STOPPING=1")
        await asyncio.gather(*(lst.stop(grace) for lst in self.listeners))
        if hasattr(self, "scheduler"):
            await self.scheduler.stop(grace=min(grace, 10.0))
        if self.admin is not None:
            await self.admin.stop()
        if hasattr(self, "webhooks"):
            await self.webhooks.close()
        if hasattr(self, "suppression"):
            await self.suppression.close()
        if hasattr(self, "deliverer"):
            await self.limits.close()
            await self.deliverer.close()
            await self.tokens.close()
        if hasattr(self, "spool"):
            await self.spool.close()
        self.events.close()


