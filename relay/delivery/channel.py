"""The mail-transaction phase of an open upstream session: commands out, replies in order.

aiosmtplib opens the session (connect, TLS, EHLO, AUTH: the rarely-run, subtle part); then
`Channel` takes the session's transport over (`transport.set_protocol`) for everything
after: MAIL, RCPT, DATA, RSET, QUIT. aiosmtplib pairs each command with exactly one read
and drops bytes that arrive while no command waits, so the replies to pipelined commands
(RFC 2920) are lost with it. Here every complete reply is parsed off one buffer, in the
order the server sent it, and kept until it is asked for; a caller that wrote N commands
in one go reads N replies. It also costs less per command than aiosmtplib (no lock, no
`wait_for` task, no timer while a reply is already buffered).
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

from relay.core.redact import redact

# Reply limits, as aiosmtplib's: RFC 5321 § 4.5.3.1.5 allows 512 octets per reply line;
# we are generous, but bounded, against a server that streams without line ends.
MAX_LINE = 8192
MAX_REPLY = 4 * MAX_LINE

# RFC 5321 § 4.5.2 (transparency): a line starting with "." gets another one.
_PERIOD = re.compile(rb"(?m)^\.")
# RFC 5321 § 2.3.8: lines end with CRLF; a lone CR or LF becomes one.
_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")


def _quote(line: bytes) -> str:
    """A bad reply line for the log, bounded; redacted before it is cut, so that a cut
    never leaves the start of a secret behind."""
    return redact(line.decode("utf-8", "replace").strip())[:200]


class ChannelClosed(ConnectionError):
    """The connection is gone (the server hung up, or we closed it)."""


class BadReply(Exception):
    """The server sent something that is not an SMTP reply (quoted, bounded)."""


def wire_body(data: bytes) -> bytes:
    """The DATA payload as it goes on the wire: CRLF line ends, dot-stuffed, with the
    final "." line. Spooled bodies are normally CRLF already and rarely have a line
    starting with ".", so the common case is two C-level scans and one copy."""
    lf = data.count(b"\n")
    if data.count(b"\r\n") != lf or data.count(b"\r") != lf:
        data = _LINE_ENDINGS.sub(b"\r\n", data)
    if data.startswith(b".") or b"\n." in data:
        data = _PERIOD.sub(b"..", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class Channel(asyncio.Protocol):
    """The protocol of an established session's transport: `send` then `reply`."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._error: BaseException | None = None  # set once: lost, EOF or garbage
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, transport: asyncio.Transport) -> Channel:
        """Become the protocol of `transport` (whose previous protocol has read its last
        reply and must not see any more bytes)."""
        channel = cls(transport)
        transport.set_protocol(channel)
        return channel

    @property
    def alive(self) -> bool:
        return self._error is None and not self._transport.is_closing()

    @property
    def tls_version(self) -> str | None:
        """The negotiated TLS version ("TLSv1.3"), or None on a plaintext connection."""
        ssl_object = self._transport.get_extra_info("ssl_object")
        return None if ssl_object is None else ssl_object.version()

    def send(self, data: bytes) -> None:
        """Write commands (each ending in CRLF) or a body; replies are read with `reply`."""
        if not self.alive:
            raise ChannelClosed("connection lost")
        self._transport.write(data)

    async def reply(self, within: float) -> tuple[int, str]:
        """The next reply: (code, text), lines of a multi-line reply joined by newlines.
        Raises TimeoutError, ChannelClosed or BadReply; after any of them the session is
        in an unknown state and must be closed."""
        if not self._replies and self._error is None:
            waiter = self._loop.create_future()
            self._waiter = waiter
            timer = self._loop.call_later(within, self._time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    def close(self) -> None:
        self._fail(ChannelClosed("connection closed"))
        self._transport.close()

    async def quit(self, within: float) -> None:
        """QUIT and wait for the 221 (RFC 5321 § 4.1.1.10), then close, whatever happens."""
        try:
            self.send(b"QUIT\r\n")
            await self.reply(within)
        except (ChannelClosed, BadReply, TimeoutError, OSError):
            pass
        finally:
            self.close()

    # asyncio.Protocol ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        buf = self._buffer
        buf += data
        try:
            self._parse()
        except BadReply as exc:
            self._fail(exc)
            self._transport.close()
            return
        if len(buf) > MAX_REPLY:
            self._fail(BadReply(f"reply too long ({len(buf)} bytes without its end)"))
            self._transport.close()
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(ChannelClosed("connection closed by the server"))
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        error = ChannelClosed("connection lost")
        if exc is not None:
            error.__cause__ = exc
        self._fail(error)

    # internals -------------------------------------------------------------------------
    def _parse(self) -> None:
        """Move every complete reply from the buffer to the queue (RFC 5321 § 4.2.1:
        "ddd-text" continues a reply, "ddd text" or "ddd" ends it)."""
        buf = self._buffer
        start = 0
        while True:
            code = -1
            lines: list[str] = []
            pos = start
            complete = False
            while True:
                end = buf.find(b"\n", pos)
                if end == -1:
                    if len(buf) - pos > MAX_LINE:
                        raise BadReply(f"reply line too long ({len(buf) - pos} bytes)")
                    break
                line = bytes(buf[pos : end + 1])
                pos = end + 1
                if len(line) > MAX_LINE:
                    raise BadReply(f"reply line too long ({len(line)} bytes)")
                head = line[:3]
                sep = line[3:4]
                if not (head.isdigit() and sep in (b"-", b" ", b"\r", b"\n")):
                    raise BadReply(_quote(line))
                if code == -1:
                    code = int(head)
                elif int(head) != code:
                    raise BadReply(_quote(line))
                lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
                if sep != b"-":
                    complete = True
                    break
            if not complete:
                break
            self._replies.append((code, "\n".join(lines)))
            start = pos
        if start:
            del buf[:start]

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())
