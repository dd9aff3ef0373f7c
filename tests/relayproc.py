"""Run the real `relay serve` as a subprocess against a generated configuration.

    cfg = RelayConfig(tmp_path, upstreams={...}, orgs=[...])
    with RelayProcess(cfg.write()) as relay:
        smtp_send(relay.port, ...)
        relay.mail_log()  # parsed JSON lines

The relay prints `relay: listening NAME ADDR:PORT tls=MODE` once its listeners are bound;
we wait for that line, never for a sleep.
"""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

LISTENING = re.compile(r"relay: listening (\S+) (\S+):(\d+) tls=(\S+)")


def plain_upstream(port: int, **extra: Any) -> dict[str, Any]:
    """An upstream on a loopback sink without TLS (tests only: plaintext is opt-in)."""
    return {"host": "127.0.0.1", "port": port, "tls": "none", "allow_plaintext": True, **extra}


class RelayConfig:
    """A config directory: relay.yaml + policies/. Spool and mail log live inside it."""

    def __init__(
        self,
        directory: Path,
        *,
        upstreams: dict[str, Any] | None = None,
        orgs: Sequence[dict[str, Any]] = (),
        hosts: dict[str, list[str]] | None = None,
        **relay: Any,
    ) -> None:
        self.dir = directory
        self.doc: dict[str, Any] = {
            "hostname": "relay.test",
            "listeners": [{"name": "smtp", "address": "127.0.0.1", "port": 0}],
            "egress_sources": {
                "a": {"address": "127.0.0.2", "ehlo": "a.relay.test"},
                "b": {"address": "127.0.0.3", "ehlo": "b.relay.test"},
            },
            "egress_pools": {"default": ["a"], "b": ["b"]},
            "upstreams": upstreams or {},
            "spool": {"path": "spool"},
            "retry": {"schedule": ["1s"], "jitter": 0, "max_age": "1h"},
            "admin": {"enabled": False},
            "log": {"mail_log": "mail.log", "level": "info"},
            "dns": {"hosts": hosts or {"mx.test": ["127.0.0.1"]}},
            # A down or throttling upstream pauses its whole queue (30 s by default);
            # tests that bring an upstream back want that pause short.
            "limits": {"slow_down_initial": "0.5s", "slow_down_max": "2s"},
        }
        self.doc.update(relay)
        self.orgs = list(orgs)

    def write(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "relay.yaml").write_text(yaml.safe_dump(self.doc, sort_keys=False))
        pdir = self.dir / "policies"
        pdir.mkdir(exist_ok=True)
        for old in pdir.glob("*.yaml"):
            old.unlink()
        for org in self.orgs:
            (pdir / f"{org['org']}.yaml").write_text(yaml.safe_dump(org, sort_keys=False))
        return self.dir


class RelayProcess:
    def __init__(self, config_dir: Path, *, env: dict[str, str] | None = None, start_timeout: float = 15.0) -> None:
        self.config_dir = config_dir
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: list[str] = []
        self.ports: dict[str, int] = {}
        self._listening = threading.Event()
        self._reader: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> RelayProcess:
        self._listening.clear()
        self.ports = {}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "serve", "-c", str(self.config_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=self.env,
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        expected = len(yaml.safe_load((self.config_dir / "relay.yaml").read_text()).get("listeners", [1]))
        deadline = time.monotonic() + self.start_timeout
        while len(self.ports) < expected:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start listening:\n{self.output()}")
            self._listening.wait(0.05)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.stderr.append(line.rstrip("\n"))
            m = LISTENING.search(line)
            if m:
                self.ports[m.group(1)] = int(m.group(3))
                self._listening.set()

    @property
    def port(self) -> int:
        return self.ports["smtp"]

    def output(self) -> str:
        return "\n".join(self.stderr[-200:])

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
            raise RuntimeError(f"relay did not stop on SIGTERM:\n{self.output()}") from None
        if self._reader:
            self._reader.join(2)
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        if self._reader:
            self._reader.join(2)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    # observations ----------------------------------------------------------------------
    def mail_log(self) -> list[dict[str, Any]]:
        path = self.config_dir / "mail.log"
        if not path.exists():
            return []
        text = path.read_text()
        # Read while the relay writes: a last line without its newline is still being
        # written (a test once parsed half of one); it is read whole the next time.
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.mail_log() if e["event"] == kind]

    def wait_events(self, kind: str, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(kind)
            if len(found) >= n:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} '{kind}' events, wanted {n}:\n{self.mail_log()}\n{self.output()}")
            time.sleep(0.05)


def send(port: int, sender: str, recipients: Sequence[str], body: str = "Hello.\r\n",
         headers: dict[str, str] | None = None, host: str = "127.0.0.1",
         source: str | None = None) -> str:
    """Send one message with smtplib; returns the final 250 reply text (holds the queue id)."""
    hdrs = {"From": sender or "MAILER-DAEMON@relay.test", "To": ", ".join(recipients), "Subject": "test",
            **(headers or {})}
    msg = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n" + body
    with smtplib.SMTP(host, port, timeout=10, source_address=(source, 0) if source else None) as s:
        s.ehlo("app.test")
        s.mail(sender)
        for r in recipients:
            code, text = s.rcpt(r)
            if code >= 400:
                raise smtplib.SMTPRecipientsRefused({r: (code, text)})
        code, text = s.data(msg.encode())
        if code != 250:
            raise smtplib.SMTPDataError(code, text)
        return text.decode()
