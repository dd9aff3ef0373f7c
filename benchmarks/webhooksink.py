"""A webhook endpoint for the throughput scenario's A/B (`run.py --webhook on|ab`): HTTPS
(aiohttp, a trustme certificate the relay trusts through `ca_file`) on loopback, on its own
thread; it verifies every call's signature as the README tells the platform to, counts
events and checks that no seq is missing per stream."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from relay.notify.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify

SECRET = "bench-webhook-secret-2f6c1a"


class WebhookSink:
    def __init__(self, directory: Path) -> None:
        self._ca = trustme.CA()
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = directory / "webhook-ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_file))
        self.secret_file = directory / "webhook-secret"
        self.secret_file.write_text(SECRET)
        self.port = 0
        self.events = 0
        self.calls = 0
        self.bad = 0
        self.last_at = 0.0
        self._seqs: dict[str, set[int]] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/hook"

    def relay_config(self) -> dict[str, Any]:
        return {"bench": {"url": self.url, "secret": f"file:{self.secret_file}",
                          "ca_file": str(self.ca_file)}}

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = verify(SECRET, request.headers.get(TIMESTAMP_HEADER, ""), body,
                    request.headers.get(SIGNATURE_HEADER, ""), now=time.time())
        with self._lock:
            self.calls += 1
            if not ok:
                self.bad += 1
                return web.Response(status=401)
            for e in json.loads(body)["events"]:
                self._seqs.setdefault(e["stream"], set()).add(e["seq"])
            self.events = sum(len(s) for s in self._seqs.values())
            self.last_at = time.monotonic()
        return web.Response(status=204)

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx = self._ca.issue_cert("127.0.0.1")
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.configure_cert(server_ctx)
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def __enter__(self) -> WebhookSink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def wait_for(self, n: int, deadline: float) -> float | None:
        """Monotonic time when `n` distinct events had arrived, or None at the deadline."""
        while time.monotonic() < deadline:
            with self._lock:
                if self.events >= n:
                    return self.last_at
            time.sleep(0.02)
        return None

    def gaps(self) -> int:
        with self._lock:
            return sum(max(s) - min(s) + 1 - len(s) for s in self._seqs.values() if s)
