"""The SMTP clients of the benchmark: Postfix's smtp-source (the load generator) and a small
asyncio client that submits at a fixed rate and times each final-dot -> 250 reply."""

from __future__ import annotations

import asyncio
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SENDER = "bench@source.example"
RECIPIENT = "invitee@dest.example"


def smtp_source_cmd(port: int, messages: int, sessions: int, size: int, *,
                    reuse: bool = False, body_file: Path | None = None) -> list[str]:
    """-c counter, -l payload bytes (or -F a pre-formatted message), -m messages, -s parallel
    sessions, one recipient each; -d sends the next message over the same connection (else
    one connection per message)."""
    payload = ["-F", str(body_file)] if body_file is not None else ["-l", str(size)]
    cmd = ["smtp-source", "-c", *payload, "-m", str(messages), "-s", str(sessions),
           "-f", SENDER, "-t", RECIPIENT, "-M", "source.example"]
    if reuse:
        cmd.append("-d")
    return [*cmd, f"127.0.0.1:{port}"]


def run_smtp_source(port: int, messages: int, sessions: int, size: int, *, reuse: bool = False,
                    timeout: float, body_file: Path | None = None) -> tuple[float, str]:
    """Run smtp-source to completion; returns (seconds, stderr). Raises on failure: it aborts
    on any unexpected reply, so a non-zero exit means a message was refused."""
    t0 = time.monotonic()
    r = subprocess.run(smtp_source_cmd(port, messages, sessions, size, reuse=reuse,
                                       body_file=body_file),
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True, timeout=timeout)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"smtp-source failed ({r.returncode}): {r.stderr[-500:]}")
    return took, r.stderr


@dataclass
class ProbeResult:
    sent: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)
    behind: int = 0  # starts that found every connection busy (the rate was not held)

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


def _message(size: int, n: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: probe {n}\r\n"
            f"Message-ID: <probe-{n}@source.example>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return head.encode() + body


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r, self.w = reader, writer

    async def reply(self) -> int:
        while True:
            line = await self.r.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            if line[3:4] != b"-":
                return int(line[:3])

    async def command(self, cmd: bytes, expect: int) -> None:
        self.w.write(cmd + b"\r\n")
        code = await self.reply()
        if code != expect:
            raise RuntimeError(f"{cmd!r} -> {code}")


async def _open(port: int) -> _Conn:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    c = _Conn(r, w)
    if await c.reply() != 220:
        raise RuntimeError("no 220 greeting")
    await c.command(b"EHLO probe.source.example", 250)
    return c


async def probe(port: int, rate: float, seconds: float, size: int, connections: int = 50,
                finish_within: float = 30.0) -> ProbeResult:
    """Open-loop submissions at `rate` messages/s for `seconds` over up to `connections`
    persistent sessions; times each final "." to its reply (the spool commit the relay
    waits for before its 250)."""
    res = ProbeResult()
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    for c in await asyncio.gather(*(_open(port) for _ in range(connections))):
        idle.put_nowait(c)
    payload = _message(size, 0)

    async def one(conn: _Conn) -> None:
        try:
            await conn.command(b"MAIL FROM:<" + SENDER.encode() + b">", 250)
            await conn.command(b"RCPT TO:<" + RECIPIENT.encode() + b">", 250)
            await conn.command(b"DATA", 354)
            conn.w.write(payload + b".\r\n")
            await conn.w.drain()
            t0 = time.perf_counter()
            code = await conn.reply()
            dt = time.perf_counter() - t0
            if code == 250:
                res.latencies.append(dt)
                res.sent += 1
            else:
                res.failed += 1
            idle.put_nowait(conn)
        except (OSError, RuntimeError, ConnectionError):
            res.failed += 1
            conn.w.close()

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if idle.empty():
            res.behind += 1
        conn = await idle.get()
        t = asyncio.create_task(one(conn))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        async with asyncio.timeout(finish_within):
            await asyncio.gather(*tasks)
    while not idle.empty():
        c = idle.get_nowait()
        try:
            c.w.write(b"QUIT\r\n")
            await asyncio.wait_for(c.reply(), 5)
        except (OSError, TimeoutError, ConnectionError):
            pass
        c.w.close()
    return res
