"""A lean SMTP sink that answers each transaction's final dot after a fixed delay.

Postfix's smtp-sink can only delay by whole seconds (`-W .:1`), so the latency-bound
scenario (the upstream "answers each transaction after 100 ms") uses this one: the 250 to
the final "." goes out exactly DELAY seconds after the dot arrived; every other command is
answered at once. It is an `asyncio.Protocol` (under uvloop when installed) that parses
whatever arrived in one pass and answers a pipelined group (RFC 2920: it advertises
PIPELINING) with one write, so its own cost per transaction stays far below the delay
and the harness measures the client, not the sink. It accepts everything.

It prints smtp-sink's `-c` counter format (`sess=N quit=N mesg=N` then CR) at each
message, so the harness reads both sinks the same way.

    python benchmarks/delaysink.py PORT DELAY_SECONDS
"""

from __future__ import annotations

import asyncio
import os
import sys

EHLO = (
    b"250-delaysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
MAX_LINE = 65536  # a command line longer than this closes the connection


class Counters:
    def __init__(self) -> None:
        self.sessions = self.quits = self.messages = 0

    def show(self) -> None:
        os.write(1, b"sess=%d quit=%d mesg=%d\r" % (self.sessions, self.quits, self.messages))


class SinkProtocol(asyncio.Protocol):
    def __init__(self, delay: float, counters: Counters) -> None:
        self.delay = delay
        self.c = counters
        self.loop = asyncio.get_running_loop()
        self.buf = b""
        self.in_data = False
        self.waiting = False  # a delayed 250 is pending: replies after it must wait
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(b"220 delaysink ESMTP\r\n")  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.c.sessions += 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.waiting:
            self.process()

    def process(self) -> None:
        """Answer every complete command in the buffer with one write; stop at a final
        dot (its reply is delayed, and later replies must follow it)."""
        out: list[bytes] = []
        buf = self.buf
        pos = 0
        while True:
            if self.in_data:
                # RFC 5321 § 4.1.1.4: the data ends with CRLF "." CRLF; the DATA line's
                # own CRLF counts as the first CRLF of an empty body.
                if buf.startswith(b".\r\n", pos):
                    end = pos + 3
                else:
                    i = buf.find(b"\r\n.\r\n", pos)
                    if i == -1:
                        pos = max(pos, len(buf) - 4)  # keep a possible partial terminator
                        break
                    end = i + 5
                pos = end
                self.in_data = False
                self.waiting = True
                self.loop.call_later(self.delay, self.final_reply)
                break
            i = buf.find(b"\r\n", pos)
            if i == -1:
                if len(buf) - pos > MAX_LINE and self.transport is not None:
                    self.transport.close()
                break
            verb = buf[pos : pos + 4].upper()
            pos = i + 2
            if verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"EHLO":
                out.append(EHLO)
            elif verb == b"QUIT":
                self.c.quits += 1
                out.append(b"221 2.0.0 Bye\r\n")
                if self.transport is not None:
                    self.transport.write(b"".join(out))
                    self.transport.close()
                self.buf = b""
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP: accept everything
                out.append(b"250 2.0.0 Ok\r\n")
        self.buf = buf[pos:]
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def final_reply(self) -> None:
        self.waiting = False
        self.c.messages += 1
        self.c.show()
        if self.transport is None:
            return
        self.transport.write(b"250 2.0.0 Ok: queued\r\n")
        if self.buf:
            self.process()  # commands that arrived while the reply was delayed


async def main(port: int, delay: float) -> None:
    counters = Counters()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SinkProtocol(delay, counters), "127.0.0.1", port, backlog=256
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
