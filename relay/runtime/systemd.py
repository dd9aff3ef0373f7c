"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("relay")


def sd_notify(message: str) -> None:
    """systemd readiness protocol (sd_notify(3)) without libsystemd: one datagram."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)
