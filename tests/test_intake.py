"""Intake decisions that the end-to-end tests cannot provoke on demand: a policy step that
hangs must fail closed (451 4.3.5) within policy_timeout, and nothing reaches the spool."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_config
from relay.core.errors import PolicyError
from relay.core.model import Envelope
from relay.events import MailLog
from relay.intake import Intake
from relay.intake.intake import ALLOWED_CACHE
from relay.smtp.server import SessionInfo
from relay.spool import Spool
from tests.relayproc import RelayConfig


class HangingLimiter:
    async def check_message(self, limits: Any, recipients: int) -> None:
        await asyncio.sleep(30)

    def connection_opened(self, client: str) -> None: ...

    def connection_closed(self, client: str) -> None: ...


@pytest.mark.interpreted  # an Intake without a Scheduler
async def test_a_hanging_policy_step_fails_closed_in_time(tmp_path: Path) -> None:
    config = load_config(str(RelayConfig(tmp_path / "relay").write()))
    spool = await Spool.open(tmp_path / "spool")
    events = MailLog(str(tmp_path / "mail.log"))
    try:
        intake = Intake(config, spool, None, events, limiter=HangingLimiter(),  # type: ignore[arg-type]
                        policy_timeout=0.2)
        session = SessionInfo("127.0.0.1", 40000, "app.test", False, None)
        env = Envelope("a@acme.test", ("b@dest.test",), b"Subject: x\r\n\r\nbody\r\n", "127.0.0.1")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(PolicyError) as caught:
            await intake.submit(session, env)
        assert loop.time() - started < 5
        assert caught.value.reply().startswith("451 4.3.5")
        assert (await spool.summary())["messages"] == 0
    finally:
        events.close()
        await spool.close()


@pytest.mark.interpreted  # an Intake without a Scheduler
async def test_allowlist_answers_are_remembered_and_bounded(tmp_path: Path) -> None:
    # Asked at connect and at MAIL for every message, so the answer per address is kept;
    # a scan of many addresses must not grow the memory without end.
    config = load_config(str(RelayConfig(tmp_path / "relay").write()))
    spool = await Spool.open(tmp_path / "spool")
    events = MailLog(str(tmp_path / "mail.log"))
    try:
        intake = Intake(config, spool, None, events)  # type: ignore[arg-type]
        networks = [ipaddress.ip_network(n) for n in config.relay.clients.networks]
        addresses = [f"127.{i // 256 % 256}.{i % 256}.1" for i in range(ALLOWED_CACHE + 500)]
        addresses += ["10.1.2.3", "::1", "::ffff:127.0.0.1", "not an address", "192.0.2.7"]
        for ip in addresses * 2:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                expected = False
            else:
                if addr.version == 6 and addr.ipv4_mapped:
                    addr = addr.ipv4_mapped
                expected = any(addr in n for n in networks)
            assert intake.allowlisted(ip) is expected, ip
            assert len(intake._allowed) <= ALLOWED_CACHE
        assert intake.allowlisted("127.0.0.1") and not intake.allowlisted("192.0.2.7")
        assert intake._allowed.get("192.0.2.7") is False  # the answer was kept
    finally:
        events.close()
        await spool.close()
