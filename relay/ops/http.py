"""What every admin HTTP site shares: JSON answers and starting a TCP site on a given port."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, default=str) + "\n",
        status=status,
        content_type="application/json",
    )


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": message, **extra}, status)


async def start_tcp_site(runner: web.AppRunner, address: str, port: int) -> int:
    """Serve `runner` on address:port; returns the bound port (0 asks for any)."""
    site = web.TCPSite(runner, address, port, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else port
