"""Spool benchmark: group-committed SQLite spool vs a files+fsync+rename spool, plus recovery
and summary timings at scale.

    python benchmarks/spool_bench.py                      # put throughput comparison
    python benchmarks/spool_bench.py --scale 200000       # also iter_pending / summary at 200k
    python benchmarks/spool_bench.py --lifecycle --size 100000   # BLOB bodies vs body segments

`--lifecycle` times the whole life of a body in the spool (put, read back, the delivered
update that deletes it), 50 at a time, once with every body a BLOB in SQLite and once with
every body in a segment file, and reports messages/s and CPU (all threads) per message.

Run on an idle machine; figures go in relay/spool/__init__.py's docstring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from relay.spool import RcptStatus, RecipientUpdate, Spool
from relay.spool.queue_id import new_queue_id

Putter = Callable[[int], Awaitable[str]]


class FileSpool:
    """The comparison variant: one file per message (JSON header line + body), written to
    tmp/, fsynced, renamed into queue/, the directory fsynced once per batch; batched by a
    writer thread exactly like the SQLite spool, so the difference is the storage only."""

    def __init__(self, directory: Path) -> None:
        self.tmp = directory / "tmp"
        self.queue = directory / "queue"
        self.tmp.mkdir(parents=True)
        self.queue.mkdir(parents=True)
        self._jobs: queue.SimpleQueue[
            tuple[str, bytes, asyncio.AbstractEventLoop, asyncio.Future[str]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.commits = 0

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < 512:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._jobs.put(None)
                    break
                batch.append(nxt)
            for qid, payload, _, _ in batch:
                fd = os.open(self.tmp / qid, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, payload)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(self.tmp / qid, self.queue / qid)
            dfd = os.open(self.queue, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            self.commits += 1
            for qid, _, loop, fut in batch:
                loop.call_soon_threadsafe(fut.set_result, qid)

    async def put(self, meta: dict[str, object], data: bytes) -> str:
        qid = new_queue_id()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        payload = json.dumps(meta).encode() + b"\n" + data
        self._jobs.put((qid, payload, loop, fut))
        return await fut

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


async def drive(put: Putter, concurrency: int, total: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for n in counter:
            t0 = time.perf_counter()
            await put(n)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def report(name: str, elapsed: float, lat: list[float], commits: int) -> None:
    lat.sort()
    n = len(lat)
    print(
        f"{name:34s} {n / elapsed:8.0f} puts/s  {commits / elapsed:7.0f} commits/s"
        f"  batch {n / max(commits, 1):6.1f}  p50 {lat[n // 2] * 1000:6.1f} ms"
        f"  p99 {lat[int(n * 0.99)] * 1000:6.1f} ms"
    )


async def _put_one(spool: Spool, n: int, body: bytes) -> str:
    return await spool.put(
        sender="a@example.com",
        recipients=[f"r{n}@example.org"],
        data=body,
        client="127.0.0.1",
        org="acme",
        account="a@example.com",
        upstream="sendgrid",
    )


async def bench_sqlite(base: Path, concurrency: int, total: int, size: int) -> None:
    spool = await Spool.open(base / f"sqlite-{concurrency}")
    body = b"x" * size

    async def put(n: int) -> str:
        return await _put_one(spool, n, body)

    elapsed, lat = await drive(put, concurrency, total)
    report(f"sqlite WAL, {concurrency} putters", elapsed, lat, spool.stats.commits)
    await spool.close()


async def bench_lifecycle(
    base: Path, concurrency: int, total: int, size: int, inline_max: int, name: str
) -> None:
    """put → read_body (from disk: no cache) → update(delivered), `concurrency` at a time."""
    spool = await Spool.open(base / f"life-{name}", body_cache_bytes=0, inline_max=inline_max)
    body = (b"x" * 76 + b"\r\n") * max(1, size // 78)

    async def life(n: int) -> str:
        qid = await _put_one(spool, n, body)
        assert len(await spool.read_body(qid)) == len(body)
        await spool.update(
            qid,
            [RecipientUpdate(f"r{n}@example.org", RcptStatus.DELIVERED, 1, 0.0, "250 ok")],
        )
        return qid

    cpu0 = time.process_time()
    elapsed, lat = await drive(life, concurrency, total)
    cpu = time.process_time() - cpu0
    report(f"lifecycle, {name}", elapsed, lat, spool.stats.commits)
    print(f"{'':34s} CPU {cpu / total * 1000:.3f} ms/msg (all threads)")
    await spool.close()


async def bench_files(base: Path, concurrency: int, total: int, size: int) -> None:
    spool = FileSpool(base / f"files-{concurrency}")
    body = b"x" * size
    meta: dict[str, object] = {"sender": "a@example.com", "org": "acme", "upstream": "sendgrid"}

    async def put(n: int) -> str:
        return await spool.put({**meta, "recipients": [f"r{n}@example.org"]}, body)

    elapsed, lat = await drive(put, concurrency, total)
    report(f"files+fsync+rename, {concurrency} putters", elapsed, lat, spool.commits)
    spool.close()


async def fill(directory: Path, count: int, size: int) -> None:
    spool = await Spool.open(directory)
    body = b"x" * size
    orgs = [f"org{i}" for i in range(50)]
    upstreams = ["sendgrid", "mailjet"] + [f"org{i}/smtp" for i in range(20)]
    start = time.perf_counter()
    done = 0
    while done < count:
        chunk = min(2000, count - done)
        await asyncio.gather(
            *(
                spool.put(
                    sender="a@example.com",
                    recipients=[f"r{n}@example.org", "b@example.org"],
                    data=body,
                    client="127.0.0.1",
                    org=orgs[n % len(orgs)],
                    account=f"u{n % 997}@example.com",
                    upstream=upstreams[n % len(upstreams)],
                    received_at=1.7e9 + n,
                )
                for n in range(done, done + chunk)
            )
        )
        done += chunk
    print(f"filled {count} messages in {time.perf_counter() - start:.1f} s")
    t0 = time.perf_counter()
    summary = await spool.summary()
    print(
        f"summary() at {summary['messages']} messages: {(time.perf_counter() - t0) * 1000:.0f} ms"
        f" ({len(summary['by_upstream'])} upstreams, {len(summary['by_org'])} orgs)"
    )
    t0 = time.perf_counter()
    listed = await spool.list(org="org7", limit=1000)
    print(f"list(org=..., limit=1000): {(time.perf_counter() - t0) * 1000:.0f} ms ({len(listed)})")
    await spool.close()


def measure_recovery(directory: str) -> None:
    """Run in a fresh process so max RSS is recovery's own."""

    async def main() -> None:
        spool = await Spool.open(directory)
        t0 = time.perf_counter()
        await spool.summary()
        print(f"summary() on a cold cache: {(time.perf_counter() - t0) * 1000:.0f} ms")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        messages = recipients = 0
        for msg in spool.iter_pending():
            messages += 1
            recipients += len(msg.recipients)
        elapsed = time.perf_counter() - t0
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"iter_pending: {messages} messages / {recipients} recipients in {elapsed:.2f} s;"
            f" max RSS {rss0 / 1024:.0f} MiB before, {rss1 / 1024:.0f} MiB after"
        )
        await spool.close()

    asyncio.run(main())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--total", type=int, default=5000)
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--scale", type=int, default=0, help="fill N messages, time recovery")
    parser.add_argument("--dir", help="work directory (default: a temporary one)")
    parser.add_argument("--lifecycle", action="store_true", help="BLOBs vs body segments")
    parser.add_argument("--rounds", type=int, default=2, help="--lifecycle: alternations")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        base = Path(tmp)
        if args.lifecycle:
            print(f"{args.total} messages of {args.size} bytes, {args.concurrency} at a time")
            for r in range(args.rounds):
                await bench_lifecycle(
                    base, args.concurrency, args.total, args.size, 1 << 62, f"blob-{r}"
                )
                await bench_lifecycle(
                    base, args.concurrency, args.total, args.size, 0, f"segments-{r}"
                )
            return
        print(f"{args.total} puts of {args.size} bytes")
        await bench_sqlite(base, args.concurrency, args.total, args.size)
        await bench_files(base, args.concurrency, args.total, args.size)
        await bench_sqlite(base, 1, min(args.total, 500), args.size)
        await bench_files(base, 1, min(args.total, 500), args.size)
        if args.scale:
            await fill(base / "scale", args.scale, args.size)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--measure-recovery", str(base / "scale")
            )
            await proc.wait()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--measure-recovery":
        measure_recovery(sys.argv[2])
    else:
        asyncio.run(main())
