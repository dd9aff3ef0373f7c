"""A small SMTP sink that answers each transaction's final dot after a fixed delay.

Postfix's smtp-sink can only delay by whole seconds (`-W .:1`), so the latency-bound
scenario (100 ms per transaction) uses this one. It prints smtp-sink's `-c` counter format
(`sess=N quit=N mesg=N` then CR) so the harness reads both sinks the same way.

    python benchmarks/delaysink.py PORT DELAY_SECONDS
"""

from __future__ import annotations

import asyncio
import sys

EHLO = b"250-delaysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n"


class Counters:
    def __init__(self) -> None:
        self.sessions = self.quits = self.messages = 0

    def show(self) -> None:
        sys.stdout.write(f"sess={self.sessions} quit={self.quits} mesg={self.messages}\r")
        sys.stdout.flush()


async def session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, c: Counters
) -> None:
    try:
        writer.write(b"220 delaysink ESMTP\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), 300)
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(EHLO)
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                while True:
                    body = await asyncio.wait_for(reader.readline(), 300)
                    if not body:
                        return
                    if body == b".\r\n":
                        break
                # The latency an upstream adds per transaction (RFC 5321 § 4.5.3.2.6
                # lets a server take up to 10 minutes here).
                await asyncio.sleep(delay)
                c.messages += 1
                c.show()
                writer.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                c.quits += 1
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:  # HELO, MAIL, RCPT, RSET, NOOP: accept everything
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    except (OSError, TimeoutError):
        return
    finally:
        c.sessions += 1
        writer.close()


async def main(port: int, delay: float) -> None:
    c = Counters()
    server = await asyncio.start_server(
        lambda r, w: session(r, w, delay, c), "127.0.0.1", port, backlog=256
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
    except ImportError:
        asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
