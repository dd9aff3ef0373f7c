"""`make demo`: the relay's first hour in thirty seconds.

Starts a local SMTP sink standing in for an upstream, a relay whose default upstream is that
sink, sends one message through the relay, shows what the sink received and what the mail
log says, then stops both. Everything binds to 127.0.0.1 on ports the kernel picks, so it
never collides with `make run`; nothing is left running afterwards. Needs the project's
virtualenv (`make install`, which `make demo` runs first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

LISTENING = re.compile(r"relay: listening \S+ (\S+):(\d+) ")


class PrintingSink:
    """An aiosmtpd handler that keeps and shows what it receives."""

    def __init__(self) -> None:
        self.received: list[Envelope] = []
        self.arrived = threading.Event()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received.append(envelope)
        self.arrived.set()
        return "250 2.0.0 OK: accepted by the demo sink"


class SinkThread:
    """The sink's own event loop on a thread, bound to a port the kernel picks."""

    def __init__(self, handler: PrintingSink) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.handler = handler
        self.server: asyncio.Server | None = None

    def start(self) -> int:
        self.thread.start()
        make = self.loop.create_server(lambda: SMTP(self.handler), "127.0.0.1", 0)
        self.server = asyncio.run_coroutine_threadsafe(make, self.loop).result(10)
        return int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _config(directory: Path, sink_port: int) -> None:
    (directory / "policies").mkdir(parents=True)
    (directory / "relay.yaml").write_text(
        "# The demo's relay: one plain listener on a free port, the sink as the only upstream.\n"
        "hostname: relay.demo.localhost\n"
        "listeners: [{address: 127.0.0.1, port: 0}]\n"
        "egress_sources: {local: {address: 127.0.0.1, ehlo: relay.demo.localhost}}\n"
        "egress_pools: {default: [local]}\n"
        "upstreams:\n"
        f"  sink: {{host: 127.0.0.1, port: {sink_port}, tls: none, allow_plaintext: true}}\n"
        "default_upstream: sink\n"
        "spool: {path: spool}\n"
        "admin: {enabled: false}\n"
        "log: {mail_log: mail.log, level: warning}\n"
    )


def _start_relay(directory: Path) -> tuple[subprocess.Popen[str], int]:
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "serve", "-c", str(directory)],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert relay.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = relay.stderr.readline()
        if not line:
            break
        if m := LISTENING.search(line):
            # Keep draining stderr so the relay never blocks on a full pipe.
            threading.Thread(target=relay.stderr.read, daemon=True).start()
            return relay, int(m.group(2))
    relay.kill()
    raise SystemExit("demo: the relay did not start (run `relay check -c DIR` on the demo config)")


def _mail_log(path: Path, want: str, within: float = 15.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            events = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if any(e.get("event") == want for e in events):
                return events
        time.sleep(0.1)
    raise SystemExit(f"demo: no '{want}' line in the mail log after {within:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the demo directory afterwards")
    args = ap.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    handler = PrintingSink()
    sink = SinkThread(handler)
    sink_port = sink.start()
    relay: subprocess.Popen[str] | None = None
    try:
        print(f"demo: a sink standing in for an upstream listens on 127.0.0.1:{sink_port}")
        _config(directory, sink_port)
        relay, port = _start_relay(directory)
        print(f"demo: the relay listens on 127.0.0.1:{port} (config: {directory}/relay.yaml)")

        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            s.ehlo("app.demo.localhost")
            s.mail("app@acme-surveys.example")
            s.rcpt("someone@example.org")
            code, reply = s.data(
                b"From: app@acme-surveys.example\r\nTo: someone@example.org\r\n"
                b"Subject: hello from the demo\r\n\r\nFirst message.\r\n"
            )
        print(f"demo: sent one message; the relay answered {code} {reply.decode()}")
        print("      (250 after DATA: the message is on disk in the relay's spool)")

        if not handler.arrived.wait(15):
            raise SystemExit("demo: the sink received nothing within 15 s")
        env = handler.received[0]
        content = env.content if isinstance(env.content, bytes) else b""
        print(f"demo: the sink received it from {env.mail_from} for {', '.join(env.rcpt_tos)}:")
        for line in content.decode(errors="replace").splitlines()[:8]:
            print(f"      | {line}")

        events = _mail_log(directory / "mail.log", "delivered")
        print("demo: the relay's mail log (one JSON line per disposition):")
        for e in events:
            detail = e.get("reply") or f"from {e.get('client')}, organisation {e.get('org')}"
            print(f"      {e['event']:<9} {e.get('queue_id', '')}  {detail}")
    finally:
        if relay is not None and relay.poll() is None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                relay.kill()
        sink.stop()
        if args.keep:
            print(f"demo: kept {directory} (spool, mail.log, relay.yaml)")
        else:
            shutil.rmtree(directory, ignore_errors=True)
    print("demo: stopped the relay and the sink; nothing is left running.")
    print("      Next: `make run` starts the relay on config/ (see the README's Quick start).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
