"""The two MTAs under test, started the same way: our relay (`relay serve`) and a Postfix
instance in its own configuration directory, each as a child process of the harness, each
forwarding everything to one upstream (the sink) on loopback."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import yaml

from benchmarks import procs
from benchmarks.sinks import wait_listening

LISTENING = re.compile(r"relay: listening (\S+) (\S+):(\d+) tls=(\S+)")
RECOVERED = re.compile(r"recovered (\d+) unfinished messages")
POSTFIX_DAEMONS = Path("/usr/lib/postfix/sbin")


class MTA:
    """What a scenario needs from an MTA under test."""

    name = "?"
    pid = 0
    port = 0

    def cpu_seconds(self) -> float:
        raise NotImplementedError

    def rss(self) -> tuple[int, int]:
        raise NotImplementedError

    def stop(self) -> float:
        raise NotImplementedError


class Relay(MTA):
    """`relay serve` with a generated config directory (spool and mail log inside it)."""

    name = "relay"

    def __init__(self, directory: Path, upstream_port: int, *, max_connections: int = 20,
                 retry_schedule: list[str] | None = None, extra: dict[str, Any] | None = None) -> None:
        self.dir = directory
        self.doc: dict[str, Any] = {
            "hostname": "relay.bench",
            "listeners": [{"name": "smtp", "address": "127.0.0.1", "port": 0}],
            "egress_sources": {"local": {"address": "127.0.0.1", "ehlo": "relay.bench"}},
            "egress_pools": {"default": ["local"]},
            "upstreams": {"sink": {"host": "127.0.0.1", "port": upstream_port, "tls": "none",
                                   "allow_plaintext": True,
                                   "throttle": {"max_connections": max_connections}}},
            "default_upstream": "sink",
            "spool": {"path": "spool"},
            "retry": {"schedule": retry_schedule or ["1m", "5m"], "jitter": 0, "max_age": "5d"},
            "admin": {"enabled": False},
            "log": {"mail_log": "mail.log", "level": "info"},
            **(extra or {}),
        }
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[tuple[float, str]] = []
        self.listening_at: float | None = None
        self.started_at = 0.0
        self.recovered: int | None = None
        self._ready = threading.Event()

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "policies").mkdir(exist_ok=True)
        (self.dir / "relay.yaml").write_text(yaml.safe_dump(self.doc, sort_keys=False))

    def start(self, timeout: float = 120.0, *, command: list[str] | None = None) -> Relay:
        """Start and wait for the listening line (after spool recovery). `command` replaces
        `python -m relay.cli` (e.g. another build or a patched entry point to compare)."""
        self.write()
        self.lines, self.listening_at, self.recovered = [], None, None
        self._ready.clear()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "relay.cli"]), "serve", "-c", str(self.dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._ready.wait(timeout) or self.listening_at is None:
            self.kill()
            raise RuntimeError("relay did not start listening:\n" + self.output())
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.monotonic()
            self.lines.append((now, line.rstrip("\n")))
            if (m := RECOVERED.search(line)) is not None:
                self.recovered = int(m.group(1))
            if (m := LISTENING.search(line)) is not None:
                self.port = int(m.group(3))
                self.listening_at = now
                self._ready.set()
        self._ready.set()

    def output(self, n: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds(self.pid, tree=True)

    def rss(self) -> tuple[int, int]:
        return procs.rss_bytes(self.pid, tree=True)  # the supervisor and its workers

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM and wait; returns the seconds it took to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("relay did not stop on SIGTERM:\n" + self.output()) from None
        return time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def count_events(self, kind: str) -> int:
        path = self.dir / "mail.log"
        if not path.exists():
            return 0
        needle = f'"event":"{kind}"'
        with path.open() as f:
            return sum(1 for line in f if needle in line)


def postfix_main_cf(base: Path, sink_port: int, max_connections: int) -> str:
    """A plain smarthost relay: everything from 127.0.0.0/8 goes to the sink; default
    durability (Postfix fsyncs each queue file before its 250); no chroot (the queue is in a
    scratch directory without the copies of /etc a chroot needs)."""
    return f"""\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
default_destination_concurrency_limit = {max_connections}
smtp_tls_security_level = none
smtpd_tls_security_level = none
maillog_file = /dev/stdout
biff = no
"""


def postfix_master_cf(smtpd_port: int) -> str:
    """The package's master.cf with smtpd on our port and chroot off everywhere."""
    proto = Path("/etc/postfix/master.cf.proto")
    out = []
    for line in proto.read_text().splitlines():
        fields = line.split()
        if not line or line[0] in "# \t" or len(fields) < 8:
            out.append(line)
            continue
        if fields[0] == "smtp" and fields[1] == "inet":
            fields[0] = f"127.0.0.1:{smtpd_port}"
        fields[4] = "n"
        out.append("  ".join(fields))
    return "\n".join(out) + "\n"


class Postfix(MTA):
    """Debian's Postfix as its own instance: `postfix -c DIR check`, then the master daemon
    in the foreground (`master -c DIR -s`, what `postfix start-fg` runs) as our child, so
    the CPU of every worker it reaps lands in its cutime/cstime."""

    name = "postfix"

    def __init__(self, base: Path, sink_port: int, *, max_connections: int = 20) -> None:
        self.base = base
        self.etc = base / "etc"
        self.sink_port = sink_port
        self.max_connections = max_connections
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Postfix:
        for d in (self.etc, self.base / "queue", self.base / "data"):
            d.mkdir(parents=True, exist_ok=True)
        # Postfix's unprivileged daemons must reach the queue; data_directory is theirs.
        for d in (self.base, *self.base.parents):
            if d == Path("/var/tmp") or d == Path("/tmp") or d == Path("/"):
                break
            d.chmod(d.stat().st_mode | 0o055)
        shutil.chown(self.base / "data", user="postfix")
        self.port = procs.free_port()
        (self.etc / "main.cf").write_text(postfix_main_cf(self.base, self.sink_port, self.max_connections))
        (self.etc / "master.cf").write_text(postfix_master_cf(self.port))
        for name in ("dynamicmaps.cf",):
            src = Path("/etc/postfix") / name
            if src.exists():
                shutil.copy(src, self.etc / name)
        # `check` creates the queue and data directories with Postfix's ownership/modes.
        chk = subprocess.run(["postfix", "-c", str(self.etc), "check"], capture_output=True,
                             text=True, timeout=60)
        if chk.returncode != 0:
            raise RuntimeError(f"postfix check failed: {chk.stdout}{chk.stderr}")
        self._log = (self.base / "maillog").open("ab")
        self.proc = subprocess.Popen([str(POSTFIX_DAEMONS / "master"), "-c", str(self.etc), "-s"],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.pid = self.proc.pid
        try:
            wait_listening(self.port, timeout, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.maillog()[-2000:]}") from None
        return self

    def cpu_seconds(self) -> float:
        return procs.cpu_seconds(self.pid, tree=True)

    def rss(self) -> tuple[int, int]:
        return procs.rss_bytes(self.pid, tree=True)

    def maillog(self) -> str:
        p = self.base / "maillog"
        return p.read_text(errors="replace") if p.exists() else ""

    def stop(self, timeout: float = 30.0) -> float:
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True, timeout=30)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
        return time.monotonic() - t0
