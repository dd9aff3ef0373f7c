"""What a worker process is told by its supervisor (`relay serve --worker I/N …`).

The supervisor (relay/runtime/supervisor.py) binds the listening sockets once and starts N copies of
`relay serve` that inherit them. Each worker is an ordinary relay node with its own spool
shard, scheduler and deliverer; this record says which shard, which inherited sockets serve
which listener, where its private admin socket goes, and which pipe to write "ready" to.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    count: int
    listen_fds: dict[str, int] = field(default_factory=dict)  # listener name -> inherited fd
    ready_fd: int | None = None  # written once ("ready\n") when the worker accepts mail
    admin_socket: str | None = None  # private Unix socket of this worker's admin API

    @classmethod
    def parse(cls, spec: str, fds: str | None, ready_fd: int | None, admin: str | None) -> WorkerSlot:
        """From `--worker I/N --listen-fds name=fd,… --ready-fd FD --admin-socket PATH`."""
        index_s, _, count_s = spec.partition("/")
        index, count = int(index_s), int(count_s)
        if not 0 <= index < count:
            raise ValueError(f"--worker {spec}: want I/N with 0 <= I < N")
        listen: dict[str, int] = {}
        for item in filter(None, (fds or "").split(",")):
            name, _, fd = item.partition("=")
            listen[name] = int(fd)
        return cls(index, count, listen, ready_fd, admin)

    def bind_to_parent(self) -> None:
        """Die with the supervisor (Linux PR_SET_PDEATHSIG): a worker left behind would keep
        its shard locked and the port open, and the next supervisor could not start."""
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # not Linux: systemd's KillMode covers it there
            return
        if os.getppid() == 1:  # the supervisor died before prctl: stop now
            raise SystemExit(1)

    def listening_socket(self, name: str) -> socket.socket | None:
        fd = self.listen_fds.get(name)
        return None if fd is None else socket.socket(fileno=fd)

    def notify_ready(self) -> None:
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, b"ready\n")
        finally:
            os.close(self.ready_fd)

