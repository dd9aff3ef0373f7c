"""What share of the latency-bound ceiling the delay sink itself allows: no relay at all.

A bare SMTP client (asyncio streams, under uvloop when installed) keeps N connections to
`delaysink.py` and sends M messages on each, one after the other, pipelined (MAIL, RCPT and
DATA in one write, RFC 2920) or in lock-step (one command, one reply). The ceiling is
N / delay messages per second; whatever a client this thin cannot reach is the sink's own
cost plus the unavoidable round trips, the best any relay can do through this sink.

    python benchmarks/bareclient.py                  # both modes, 20 x 50, 100 ms
    python benchmarks/bareclient.py --connections 20 --per-connection 100 --mode pipelined
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procs
from benchmarks.sinks import Sink


async def _expect(reader: asyncio.StreamReader, code: bytes) -> None:
    while True:
        line = await asyncio.wait_for(reader.readline(), 30)
        if not line.startswith(code):
            raise RuntimeError(f"expected {code!r}, got {line!r}")
        if line[3:4] != b"-":
            return


async def _connection(port: int, messages: int, body: bytes, pipelined: bool) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _expect(reader, b"220")
    writer.write(b"EHLO bare.test\r\n")
    await _expect(reader, b"250")
    mail, rcpt, data = b"MAIL FROM:<s@bare.test>\r\n", b"RCPT TO:<r@bare.test>\r\n", b"DATA\r\n"
    for _ in range(messages):
        if pipelined:
            writer.write(mail + rcpt + data)
            await _expect(reader, b"250")
            await _expect(reader, b"250")
            await _expect(reader, b"354")
        else:
            writer.write(mail)
            await _expect(reader, b"250")
            writer.write(rcpt)
            await _expect(reader, b"250")
            writer.write(data)
            await _expect(reader, b"354")
        writer.write(body)
        await _expect(reader, b"250")
    writer.write(b"QUIT\r\n")
    await _expect(reader, b"221")
    writer.close()
    return messages


async def run(port: int, connections: int, per: int, size: int, pipelined: bool) -> float:
    """Messages per second over the whole run (first connect to last 250)."""
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: bare\r\n\r\n" + line * max(1, size // len(line)) + b".\r\n"
    t0 = time.monotonic()
    done = await asyncio.gather(
        *(_connection(port, per, body, pipelined) for _ in range(connections))
    )
    return sum(done) / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--delay", type=float, default=0.1)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--per-connection", type=int, default=50)
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--mode", choices=["pipelined", "lock-step", "both"], default="both")
    ap.add_argument("--port", type=int, help="an already running sink (default: start one)")
    a = ap.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    modes = ["pipelined", "lock-step"] if a.mode == "both" else [a.mode]
    ceiling = a.connections / a.delay
    sink = None if a.port else Sink(procs.free_port(), delay=a.delay).start()
    port = a.port or (sink.port if sink else 0)
    try:
        for mode in modes:
            rate = runner(run(port, a.connections, a.per_connection, a.size, mode == "pipelined"))
            print(f"{mode:9}  {a.connections} x {a.per_connection} messages, "
                  f"{a.delay * 1000:g} ms: {rate:6.1f} msg/s = {100 * rate / ceiling:5.1f}% "
                  f"of {ceiling:g}  (load {os.getloadavg()[0]:.2f})")
    finally:
        if sink is not None:
            sink.stop()


if __name__ == "__main__":
    main()
