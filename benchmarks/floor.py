"""The floor: the least a store-and-forward SMTP relay written in Python on uvloop can cost
per message on the throughput workload, to set the relay's own figures against.

It does only what every durable relay must: greet, answer EHLO/MAIL/RCPT/DATA/QUIT, find
the end of DATA, append the body to a file and fdatasync it (group commit: one sync for all
bodies that arrived meanwhile) before `250`, then send the message upstream over pipelined
persistent connections. No address or body checks, no policy, limits, queue database,
retries, events or mail log; a message the upstream refuses is dropped. Not a relay: a
measuring stick. The benchmark runs it in the relay's place:

    .venv/bin/python benchmarks/run.py --skip-postfix --workers 2 \\
        --relay-command ".venv/bin/python benchmarks/floor.py"

It reads the generated `relay.yaml` (workers, the sink's port, max_connections), listens on
127.0.0.1 port 0 and prints the relay's "listening" line, which the harness waits for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import uvloop
import yaml

_END = b"\r\n.\r\n"


class Store:
    """Bodies appended to one file; `put` resolves once an fdatasync covers them."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    def put(self, data: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiting.append((data, fut))
        if not self._busy:
            self._busy = True
            self._task = loop.create_task(self._commit())
        return fut

    async def _commit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            batch, self._waiting = self._waiting, []
            os.write(self._fd, b"".join(d for d, _ in batch))
            await loop.run_in_executor(None, os.fdatasync, self._fd)
            for _, fut in batch:
                fut.set_result(None)
        self._busy = False


class Upstream:
    """Pipelined persistent connections to the sink, each sending one message at a time."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.connections = connections
        self.tasks: list[asyncio.Task[None]] = []
        self.queue: asyncio.Queue[tuple[bytes, bytes, bytes]] = asyncio.Queue()

    def start(self) -> None:
        for _ in range(self.connections):
            task = asyncio.get_running_loop().create_task(self._sender())
            task.add_done_callback(_report)
            self.tasks.append(task)

    async def _sender(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        await _reply(reader)
        writer.write(b"EHLO floor.bench\r\n")
        await _reply(reader)
        while True:
            sender, rcpt, body = await self.queue.get()
            writer.write(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (sender, rcpt))
            for _ in range(3):
                await _reply(reader)
            writer.write(body)  # still dot-stuffed, ending with CRLF.CRLF
            await _reply(reader)


def _report(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        print(f"floor: upstream connection failed: {task.exception()!r}", file=sys.stderr)


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("upstream closed")
        if line[3:4] != b"-":
            return line


class Session(asyncio.Protocol):
    def __init__(self, store: Store, upstream: Upstream) -> None:
        self.store = store
        self.upstream = upstream
        self.buf = b""
        self.in_data = False
        self.sender = b""
        self.rcpt = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.write(b"220 floor.bench ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out: list[bytes] = []
        while self.buf:
            if self.in_data:
                end = self.buf.find(_END)
                if end < 0:
                    break
                body, self.buf = self.buf[: end + 5], self.buf[end + 5 :]
                self.in_data = False
                self._stored(body)
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line, self.buf = self.buf[:nl], self.buf[nl + 2 :]
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                out.append(b"250-floor.bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                self.sender = line[line.find(b"<") + 1 : line.rfind(b">")]
                out.append(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                self.rcpt = line[line.find(b"<") + 1 : line.rfind(b">")]
                out.append(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                self.in_data = True
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                self.transport.write(b"".join(out))  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            self.transport.write(b"".join(out))  # type: ignore[attr-defined]

    def _stored(self, body: bytes) -> None:
        fut = self.store.put(body)
        sender, rcpt = self.sender, self.rcpt

        def done(_: asyncio.Future[None]) -> None:
            if not self.transport.is_closing():
                self.transport.write(b"250 2.0.0 Ok: queued\r\n")  # type: ignore[attr-defined]
            self.upstream.queue.put_nowait((sender, rcpt, body))

        fut.add_done_callback(done)


async def _worker(sock: socket.socket, directory: Path, index: int, port: int,
                  connections: int) -> None:
    store = Store(directory / f"floor-{index}.dat")
    upstream = Upstream(port, connections)
    upstream.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Session(store, upstream), sock=sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1:3] != ["serve", "-c"]:
        print("usage: floor.py serve -c DIR", file=sys.stderr)
        return 2
    directory = Path(sys.argv[3])
    doc = yaml.safe_load((directory / "relay.yaml").read_text())
    sink = doc["upstreams"][doc["default_upstream"]]
    workers = doc.get("workers", 1)
    workers = (os.cpu_count() or 1) if workers == "auto" else int(workers)
    connections = max(1, int(sink.get("throttle", {}).get("max_connections", 20)) // workers)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    children = []
    for index in range(workers):
        pid = os.fork()
        if pid == 0:
            uvloop.run(_worker(sock, directory, index, int(sink["port"]), connections))
            os._exit(0)
        children.append(pid)
    print(f"relay: listening smtp 127.0.0.1:{sock.getsockname()[1]} tls=off", file=sys.stderr,
          flush=True)

    def stop(*_: object) -> None:
        for p in children:
            os.kill(p, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    statuses = [os.waitpid(p, 0)[1] for p in children]
    return 0 if all(status == 0 for status in statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
