"""An SMTP server protocol (ours, or aiosmtpd's as the reference) on one end of a real
socket pair, and a raw client on the other, both on one event loop that the test drives
step by step: the stateful fuzzer (test_smtp_fuzz.py) and the differential test
(test_smtp_differential.py) send exact bytes, let the loop run until the server has nothing
left to do, and read the replies. A real kernel transport, real TLS (loop.start_tls), no
sleeps: `settle` runs loop iterations until the server's work is done (bounded).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relay.core.errors import AccessDenied
from relay.core.model import Envelope, TlsMode
from relay.smtp.interfaces import ListenerSettings, SessionInfo
from relay.smtp.session import SmtpSession
from relay.smtp.users import Users, hash_password

PASSWORD = "fuzz-password-1"
REPLY_LINE = re.compile(rb"[2-5]\d\d(?:[ -][\x20-\x7e]*)?")


class RecordingIntake:
    """Accepts everyone (the state machine is under test, not relay access), except the
    sender `denied@x.test` and recipients at refused.test; records what it is asked."""

    def __init__(self) -> None:
        self.users = Users({"fuzz": hash_password(PASSWORD, n=2**4)})
        self.submitted: list[Envelope] = []
        self.accepted_rcpts: set[str] = set()

    def check_connect(self, peer_ip: str) -> None:
        return None

    def authenticate(self, session: SessionInfo, user: str, password: str) -> bool:
        return self.users.verify(user, password)

    def check_sender(self, session: SessionInfo, sender: str) -> None:
        if sender == "denied@x.test":
            raise AccessDenied()

    def check_recipient(self, session: SessionInfo, sender: str, rcpt: str) -> None:
        if rcpt.endswith("@refused.test"):
            raise AccessDenied("No such user", code=550, enhanced="5.1.1")
        self.accepted_rcpts.add(rcpt)

    async def submit(self, session: SessionInfo, envelope: Envelope) -> str:
        self.submitted.append(envelope)
        return f"Q{len(self.submitted)}"


class Owner:
    """The SessionOwner a Listener would be, without a listening socket."""

    def __init__(self, settings: ListenerSettings, intake: RecordingIntake) -> None:
        self.settings = settings
        self.log = logging.getLogger("relay.listener.wire")
        self._intake = intake
        self.sessions: list[SmtpSession] = []

    @property
    def intake(self) -> RecordingIntake:
        return self._intake

    def register(self, session: object) -> None:
        assert isinstance(session, SmtpSession)
        self.sessions.append(session)

    def unregister(self, session: object) -> None:
        return None


class ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.closed = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


@dataclass
class Wire:
    """One connection: `server` is the protocol under test, the rest is the client side."""

    loop: asyncio.AbstractEventLoop
    server: asyncio.Protocol
    transport: asyncio.Transport
    client: ClientProtocol
    busy: Callable[[], bool]  # True while the server still works on something
    replies: list[list[bytes]] = field(default_factory=list)
    bad_lines: list[bytes] = field(default_factory=list)
    _pending: list[bytes] = field(default_factory=list)

    async def send(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)
        await self.settle()

    async def settle(self, limit: float = 5.0) -> None:
        """Run the loop until the server is idle and its output has reached us (bounded)."""
        deadline = self.loop.time() + limit
        idle = 0
        while idle < 6 and self.loop.time() < deadline:
            await asyncio.sleep(0 if not self.busy() else 0.001)
            idle = 0 if self.busy() else idle + 1
        self._parse()

    def _parse(self) -> None:
        buf = self.client.data
        while True:
            i = buf.find(b"\r\n")
            if i < 0:
                break
            line = bytes(buf[:i])
            del buf[: i + 2]
            if not REPLY_LINE.fullmatch(line):
                self.bad_lines.append(line)
                continue
            self._pending.append(line)
            if len(line) == 3 or line[3:4] == b" ":
                self.replies.append(self._pending)
                self._pending = []

    def take(self) -> list[list[bytes]]:
        out, self.replies = self.replies, []
        return out

    async def starttls(self, ctx: ssl.SSLContext) -> bool:
        try:
            new = await asyncio.wait_for(
                self.loop.start_tls(self.transport, self.client, ctx, server_hostname="localhost"),
                5,
            )
        except (OSError, TimeoutError, ssl.SSLError, ConnectionError):
            return False
        assert new is not None
        self.transport = new
        await self.settle()
        return True

    def close(self) -> None:
        self.transport.abort()


async def connect(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.Protocol],
    busy: Callable[[asyncio.Protocol], bool],
) -> Wire:
    server_sock, client_sock = socket.socketpair()
    for s in (server_sock, client_sock):
        s.setblocking(False)
    server_transport, server = await loop.connect_accepted_socket(factory, server_sock)
    transport, client = await loop.create_connection(ClientProtocol, sock=client_sock)
    wire = Wire(loop, server, transport, client, lambda: busy(server))
    wire._server_transport = server_transport  # type: ignore[attr-defined]
    await wire.settle()
    return wire


def our_settings(**overrides: Any) -> ListenerSettings:
    base: dict[str, Any] = {
        "name": "wire",
        "address": "127.0.0.1",
        "port": 0,
        "tls": TlsMode.STARTTLS,
        "hostname": "relay.test",
    }
    base.update(overrides)
    return ListenerSettings(**base)


def our_session_busy(protocol: asyncio.Protocol) -> bool:
    assert isinstance(protocol, SmtpSession)
    # A submit or AUTH in flight; not a STARTTLS handshake, which waits for the client.
    return protocol._task is not None and not protocol._tls_pending


def server_tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
