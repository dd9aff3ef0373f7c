"""The upstream stand-ins: Postfix's smtp-sink (fast, C) or our delaysink (fixed delay per
transaction), both as subprocesses whose `mesg=N` counter we read to know when every
message has arrived."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

COUNTER = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")


class Sink:
    """A sink subprocess on a loopback port; `count` is the messages it has received."""

    def __init__(self, port: int, *, delay: float = 0.0) -> None:
        self.port = port
        self.delay = delay
        self.count = 0
        self.sessions = 0  # connections the sink has seen end
        self.first_at: float | None = None
        self.progress: list[tuple[float, int]] = []  # (monotonic time, count) as reported
        self._cond = threading.Condition()
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        if self.delay:
            return [sys.executable, str(Path(__file__).with_name("delaysink.py")), str(self.port),
                    str(self.delay)]
        # -c: running counters on stdout, updated at every "." (and session end); -m: accept
        # up to 512 sessions at once; 8BITMIME/PIPELINING announced by default.
        cmd = ["smtp-sink", "-c", "-m", "512"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        return [*cmd, f"127.0.0.1:{self.port}", "1024"]

    def start(self) -> Sink:
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_listening(self.port, 10.0, self.proc)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return
            buf += chunk
            *records, buf = re.split(rb"[\r\n]", buf)
            last = next((m for m in map(COUNTER.search, reversed(records)) if m), None)
            if last is not None:
                with self._cond:
                    n = int(last.group(2))
                    self.sessions = int(last.group(1))
                    if n and self.first_at is None:
                        self.first_at = time.monotonic()
                    self.count = n
                    self.progress.append((time.monotonic(), n))
                    self._cond.notify_all()

    def wait_for(self, n: int, deadline: float) -> float | None:
        """Block until `n` messages arrived (returns monotonic time) or the deadline passed."""
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))
            return time.monotonic()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_listening(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}: {err}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def time_at(progress: list[tuple[float, int]], n: int) -> float | None:
    """When the sink's count first reached `n` (from its progress reports)."""
    return next((t for t, count in progress if count >= n), None)
