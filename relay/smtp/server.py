"""SMTP listeners: bind (or take an inherited socket), accept sessions, drain them on stop.

The session itself (the command and DATA state machine) is relay/smtp/session.py; what it
asks of the rest of the relay is the `Intake` of relay/smtp/interfaces.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

from relay.core.model import TlsMode
from relay.smtp.bodycheck import vector_scan
from relay.smtp.interfaces import Intake, ListenerSettings, SessionInfo
from relay.smtp.replies import R_SHUTDOWN
from relay.smtp.session import CLOSE_FLUSH_TIMEOUT, SmtpSession

__all__ = ["Intake", "Listener", "ListenerSettings", "SessionInfo"]


class Listener:
    """One listening socket and the SMTP sessions accepted on it."""

    def __init__(
        self,
        settings: ListenerSettings,
        intake: Intake,
        *,
        logger: logging.Logger | None = None,
    ) -> None:
        if settings.tls is not TlsMode.NONE and not (settings.cert_file and settings.key_file):
            raise ValueError(
                f"listener {settings.name}: TLS mode {settings.tls} needs cert and key"
            )
        self.settings = settings
        self.log = logger or logging.getLogger("relay.listener")
        self._intake = intake
        self._server: asyncio.Server | None = None
        self._sessions: set[SmtpSession] = set()
        self._no_sessions = asyncio.Event()
        self._no_sessions.set()

    @property
    def intake(self) -> Intake:
        return self._intake

    def set_intake(self, intake: Intake) -> None:
        """Config reload: sessions read the intake at connect, AUTH and MAIL, so new
        sessions and new transactions use this one; a transaction in flight keeps its own."""
        self._intake = intake

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("listener not started")
        return int(self._server.sockets[0].getsockname()[1])

    def _tls_context(self) -> ssl.SSLContext:
        assert self.settings.cert_file and self.settings.key_file
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.settings.cert_file, self.settings.key_file)
        return ctx

    async def start(self, sock: socket.socket | None = None) -> None:
        """Bind on the running loop, or serve `sock`, a listening socket inherited from
        the supervisor (relay/runtime/supervisor.py)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        vector_scan()  # the large-body checks' library, loaded before the first message
        ctx = None if s.tls is TlsMode.NONE else self._tls_context()
        starttls_ctx = ctx if s.tls is TlsMode.STARTTLS else None
        extra: dict[str, Any] = {}
        if s.tls is TlsMode.IMPLICIT:
            extra = {"ssl": ctx, "ssl_handshake_timeout": min(s.idle_timeout, 60.0)}
        if sock is not None:
            extra["sock"] = sock
        else:
            extra.update(host=s.address, port=s.port, reuse_address=True)
        self._server = await loop.create_server(
            lambda: SmtpSession(self, starttls_ctx, loop), **extra
        )
        self.log.info(
            "listener %s listening on %s port %d (%s)", s.name, s.address, self.port, s.tls
        )

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let transactions in progress finish (up to `grace` seconds);
        every session gets 421 4.3.2 once it is outside a transaction, or when grace ends."""
        if self._server is None:
            return
        self._server.close()
        for session in list(self._sessions):
            session.begin_drain()
        try:
            if self._sessions:
                await asyncio.wait_for(self._no_sessions.wait(), grace)
        except TimeoutError:
            self.log.warning(
                "listener %s: %d session(s) still open after %.1fs grace, closing them",
                self.settings.name,
                len(self._sessions),
                grace,
            )
            for session in list(self._sessions):
                session.goodbye(R_SHUTDOWN)
            try:
                await asyncio.wait_for(self._no_sessions.wait(), CLOSE_FLUSH_TIMEOUT + 1.0)
            except TimeoutError:
                self.log.error("listener %s: sessions did not close", self.settings.name)
        try:
            await asyncio.wait_for(self._server.wait_closed(), CLOSE_FLUSH_TIMEOUT)
        except TimeoutError:
            pass
        self.log.info("listener %s stopped", self.settings.name)

    def register(self, session: object) -> None:
        assert isinstance(session, SmtpSession)
        self._sessions.add(session)
        self._no_sessions.clear()

    def unregister(self, session: object) -> None:
        assert isinstance(session, SmtpSession)
        self._sessions.discard(session)
        if not self._sessions:
            self._no_sessions.set()
