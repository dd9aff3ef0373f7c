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

from relay.auth import Users
from relay.auth import load_users as read_users
from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.delivery import Deliverer, DnsResolver
from relay.errors import SpoolError
from relay.events import MailLog, Metrics
from relay.intake import Intake
from relay.listener import Listener, ListenerSettings
from relay.model import TlsMode
from relay.penalty import PenaltyBox
from relay.scheduler import Scheduler
from relay.spool import Spool

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

    def __init__(self, config: Config, location: str | None) -> None:
        self.config = config
        self.location = location
        self.metrics = Metrics()
        self.events = MailLog(mail_log_path(config), self.metrics)
        self.listeners: list[Listener] = []
        self.stopping = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        self.spool = await Spool.open(cfg.spool_path)
        self.deliverer = Deliverer(DnsResolver(cfg.relay.dns.hosts, lifetime=cfg.relay.dns.timeout))
        self.scheduler = Scheduler(cfg, self.spool, self.deliverer, self.events)
        recovered = self.scheduler.recover(self.spool.iter_pending())
        log.info("recovered %d unfinished messages from %s", recovered, cfg.spool_path)
        self.penalty = PenaltyBox()  # failed-AUTH memory; survives reloads, not restarts
        self.intake = Intake(cfg, self.spool, self.scheduler, self.events, users=load_users(cfg),
                             penalty=self.penalty)
        self.scheduler.start()
        for settings in listener_settings(cfg):
            lst = Listener(settings, self.intake, logger=logging.getLogger(f"relay.listener.{settings.name}"))
            await lst.start()
            self.listeners.append(lst)
            # Tests and operators wait for this exact line.
            print(f"relay: listening {settings.name} {settings.address}:{lst.port} tls={settings.tls.value}",
                  file=sys.stderr, flush=True)
        sd_notify("READY=1\nSTATUS=accepting mail")

    async def reload(self) -> bool:
        """SIGHUP: the new config replaces the old only if it validates; secrets are re-read."""
        try:
            new = await asyncio.to_thread(load_config, self.location)
        except ConfigErrors as exc:
            for e in exc.errors:
                log.error("reload refused, old configuration keeps running: %s", e)
            return False
        for w in new.warnings:
            log.warning("%s", w)
        self.config = new
        self.scheduler.reconfigure(new)
        self.intake = Intake(new, self.spool, self.scheduler, self.events, users=load_users(new),
                             penalty=self.penalty)
        for lst in self.listeners:
            lst.set_intake(self.intake)
        log.info("configuration reloaded")
        return True

    async def stop(self, grace: float = 30.0) -> None:
        sd_notify("STOPPING=1")
        await asyncio.gather(*(lst.stop(grace) for lst in self.listeners))
        await self.scheduler.stop(grace=min(grace, 10.0))
        await self.deliverer.close()
        await self.spool.close()
        self.events.close()


async def run(location: str | None) -> int:
    try:
        config = load_config(location)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.relay.log.level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # aiosmtpd logs every command at INFO under "mail.log"; our own mail log is the record.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    for w in config.warnings:
        log.warning("%s", w)
    relay = Relay(config, location)
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


def serve(location: str | None) -> int:
    try:
        import uvloop

        return uvloop.run(run(location))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run(location))
