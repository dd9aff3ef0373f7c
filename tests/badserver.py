"""A scriptable misbehaving SMTP server (raw asyncio, no aiosmtpd): it stalls, hangs up,
or answers garbage at the step a test names, so that the relay's delivery side meets every
upstream fault on a real socket.

    with BadServer(stall="rcpt") as bad:          # never answers RCPT
    with BadServer(reply={"greeting": b"HELLO WORLD\\r\\n"}) as bad:
    with BadServer(hangup="data-body") as bad:    # 354, reads a little, closes
    with BadServer(starttls=False) as bad:        # never offers STARTTLS (a stripping MITM)

Steps, in dialogue order: "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data"
(the 354), "dot" (the reply to the final "."). A stalled step keeps the connection open
without a reply until the server stops (bounded: the server's own `hold` timeout).
Every command line it read is in `commands`; every message it fully accepted in `messages`.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Mapping
from typing import Any

STEPS = ("greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "dot")
_DEFAULT = {
    "greeting": b"220 bad.test ESMTP\r\n",
    "starttls": b"220 2.0.0 Ready to start TLS\r\n",
    "auth": b"235 2.7.0 Authentication successful\r\n",
    "mail": b"250 2.1.0 OK\r\n",
    "rcpt": b"250 2.1.5 OK\r\n",
    "data": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "dot": b"250 2.0.0 OK queued\r\n",
}


class BadServer:
    """One misbehaving server on 127.0.0.1, on its own thread and event loop."""

    def __init__(
        self,
        *,
        stall: str | None = None,
        hangup: str | None = None,
        reply: Mapping[str, bytes] | None = None,
        starttls: bool = False,
        tls_context: ssl.SSLContext | None = None,
        auth: bool = False,
        hold: float = 30.0,
        extensions: tuple[str, ...] = (),
    ) -> None:
        for step in (stall, hangup, *(reply or {})):
            if step is not None and step not in (*STEPS, "data-body"):
                raise ValueError(f"unknown step {step!r}")
        if starttls and tls_context is None:
            raise ValueError("starttls=True needs a tls_context")
        self.stall = stall
        self.hangup = hangup
        self.reply = dict(reply or {})
        self.starttls = starttls
        self.tls_context = tls_context
        self.auth = auth
        self.hold = hold
        self.extensions = extensions  # more EHLO keywords to offer, e.g. ("DSN",)
        self.port = 0
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.connections = 0
        self.stalled = threading.Event()  # set when a connection reached the stalled step
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> BadServer:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="badserver", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0, limit=1 << 20)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> BadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # the dialogue ----------------------------------------------------------------------
    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            async with asyncio.timeout(self.hold):
                await self._dialogue(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    @staticmethod
    async def _read_to_eof(reader: asyncio.StreamReader) -> None:
        while await reader.read(65536):
            pass

    async def _answer(
        self, step: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, default: bytes
    ) -> bool:
        """Send the reply for `step`; False when the script says stall or hang up here."""
        if self.stall == step:
            self.stalled.set()
            await self._read_to_eof(reader)  # never answer; wait for the client to give up
            return False
        if self.hangup == step:
            return False
        writer.write(self.reply.get(step, default))
        await writer.drain()
        return True

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._answer("greeting", reader, writer, _DEFAULT["greeting"]):
            return
        envelope: dict[str, Any] = {"rcpt": []}
        while True:
            line = await reader.readline()
            if not line:
                return
            self.commands.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            verb = line[:4].upper()
            if verb == b"EHLO" or verb == b"HELO":
                lines = ["bad.test", "PIPELINING", "SIZE 10000000", "8BITMIME"]
                if self.starttls:
                    lines.append("STARTTLS")
                if self.auth:
                    lines.append("AUTH PLAIN LOGIN")
                lines += self.extensions
                text = "".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n" for i, x in enumerate(lines)
                )
                if not await self._answer("ehlo", reader, writer, text.encode()):
                    return
            elif verb == b"STAR":
                if not await self._answer("starttls", reader, writer, _DEFAULT["starttls"]):
                    return
                assert self.tls_context is not None
                await writer.start_tls(self.tls_context)
            elif verb == b"AUTH":
                if not await self._answer("auth", reader, writer, _DEFAULT["auth"]):
                    return
            elif verb == b"MAIL":
                if not await self._answer("mail", reader, writer, _DEFAULT["mail"]):
                    return
            elif verb == b"RCPT":
                envelope["rcpt"].append(line)
                if not await self._answer("rcpt", reader, writer, _DEFAULT["rcpt"]):
                    return
            elif verb == b"DATA":
                if not await self._answer("data", reader, writer, _DEFAULT["data"]):
                    return
                body = bytearray()
                while True:
                    chunk = await reader.readline()
                    if not chunk:
                        return
                    if self.hangup == "data-body" and len(body) > 0:
                        return  # one line in: the connection breaks mid-DATA
                    if chunk == b".\r\n":
                        break
                    body += chunk
                if not await self._answer("dot", reader, writer, _DEFAULT["dot"]):
                    return
                if self.reply.get("dot", _DEFAULT["dot"]).startswith(b"2"):
                    self.messages.append(bytes(body))
            elif verb in (b"RSET", b"NOOP"):
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.1 Unrecognized command\r\n")
            await writer.drain()
