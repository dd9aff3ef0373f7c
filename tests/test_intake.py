"""Intake decisions that the end-to-end tests cannot provoke on demand: a policy step that
hangs must fail closed (451 4.3.5) within policy_timeout, and nothing reaches the spool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from relay.config import load_config
from relay.core.errors import PolicyError
from relay.core.model import Envelope
from relay.events import MailLog
from relay.intake import Intake
from relay.smtp.server import SessionInfo
from relay.spool import Spool
from tests.relayproc import RelayConfig


class HangingLimiter:
    async def check_message(self, limits: Any, recipients: int) -> None:
        await asyncio.sleep(30)

    def connection_opened(self, client: str) -> None: ...

    def connection_closed(self, client: str) -> None: ...


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
