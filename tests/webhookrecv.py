"""A real webhook receiver for tests: aiohttp over HTTPS (a trustme certificate for
127.0.0.1) on a loopback port, on its own thread and event loop. It verifies each call's
signature as the README tells the platform to, can fail its first calls (or every call
while `down`), and records every event it accepted.

    with WebhookReceiver(ca, secret="s3cret", fail_first=2) as rx:
        rx.url                      # https://127.0.0.1:PORT/hook
        rx.wait_for(lambda evs: len(evs) >= 4)
        rx.events, rx.calls, rx.bad_signatures
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from relay.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tests.certs import CertAuthority


class WebhookReceiver:
    def __init__(self, ca: CertAuthority, *, secret: str, fail_first: int = 0,
                 port: int = 0) -> None:
        self.ca = ca
        self.secret = secret
        self.fail_first = fail_first
        self.port = port
        self.down = False  # answer 503 to everything
        self.calls = 0
        self.failed_calls = 0
        self.bad_signatures = 0
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        with self._lock:
            self.calls += 1
            if not verify(self.secret, request.headers.get(TIMESTAMP_HEADER, ""), body,
                          request.headers.get(SIGNATURE_HEADER, ""), now=time.time()):
                self.bad_signatures += 1
                return web.Response(status=401, text="bad signature")
            if self.down or self.failed_calls < self.fail_first:
                self.failed_calls += 1
                return web.Response(status=503, text="try later")
            batch = json.loads(body)
            self.events.extend(batch["events"])
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port,
                           ssl_context=self.ca.server_context("127.0.0.1"), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> WebhookReceiver:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def wait_for(self, cond: Callable[[list[dict[str, Any]]], bool],
                 timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            evs = self.snapshot()
            if cond(evs):
                return evs
            if time.monotonic() > deadline:
                raise AssertionError(f"webhook receiver: condition not met in {timeout}s;"
                                     f" {len(evs)} events: {[e['type'] for e in evs]}")
            time.sleep(0.05)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.snapshot() if e["type"] == kind]


def assert_no_gaps(events: list[dict[str, Any]]) -> dict[str, int]:
    """Per stream, the seqs received form one unbroken run from the first (duplicates
    allowed: at least once); returns each stream's last seq."""
    by_stream: dict[str, set[int]] = {}
    for e in events:
        by_stream.setdefault(e["stream"], set()).add(e["seq"])
    for stream, seqs in by_stream.items():
        lo, hi = min(seqs), max(seqs)
        missing = sorted(set(range(lo, hi + 1)) - seqs)
        assert not missing, f"stream {stream}: seqs {missing} never arrived"
    return {s: max(v) for s, v in by_stream.items()}
