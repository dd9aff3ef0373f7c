"""The three scenarios: throughput (relay vs Postfix), latency-bound upstream, and scale
(a large queue built while the upstream is down, restart, summary, drain)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import procs
from benchmarks.clients import ProbeResult, probe, run_smtp_source
from benchmarks.mtas import Postfix, Relay
from benchmarks.sinks import Sink, time_at
from benchmarks.webhooksink import WebhookSink


@dataclass
class Settings:
    messages: int = 20_000
    sessions: int = 50
    size: int = 5_000
    upstream_connections: int = 20
    reuse: bool = False  # smtp-source -d
    probe_seconds: float = 10.0
    latency_messages: int = 4_000
    delay: float = 0.1
    scale_messages: int = 200_000
    workdir: Path = Path("/var/tmp")
    profile: Path | None = None  # write a py-spy profile of the relay here (throughput)
    relay_command: list[str] | None = None  # instead of `python -m relay.cli`
    workers: int | str = "auto"  # the relay's `workers:` for throughput and latency
    webhook: str = "off"  # throughput: off | on | ab (each repeat: relay without, then with)
    body_file: Path | None = None  # a MIME message (benchmarks/mime.py) instead of -l bytes

    def deadline(self, messages: int, min_rate: float = 50.0) -> float:
        """Every wait is bounded: generous for a slow machine, never unbounded."""
        return 60.0 + messages / min_rate


@dataclass
class Throughput:
    mta: str
    messages: int
    seconds: float = float("nan")
    ingest_seconds: float = float("nan")
    cpu_seconds: float = float("nan")
    rss_peak: int = 0
    main_thread_cpu: float = float("nan")  # relay: the event loops' own threads, summed
    loop_processes: int = 1  # relay: processes whose event loop did work (workers)
    load: float = float("nan")  # 1-minute load average at the end: other work on the machine
    probe: ProbeResult | None = None
    probe_rate: float = 0.0
    webhook_events: int = 0  # events the webhook endpoint received (relay+webhook)
    webhook_lag: float = float("nan")  # seconds after the sink's last message until all had
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_seconds / self.messages


def _start(kind: str, base: Path, sink_port: int, s: Settings,
           hook: WebhookSink | None = None) -> Relay | Postfix:
    if kind.startswith("relay"):
        extra: dict[str, object] = {"workers": s.workers}
        if hook is not None:
            extra["webhooks"] = hook.relay_config()
        return Relay(base / "relay", sink_port, max_connections=s.upstream_connections,
                     extra=extra).start(command=s.relay_command)
    return Postfix(base / "postfix", sink_port, max_connections=s.upstream_connections).start()


def _py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    py_spy = Path(sys.executable).with_name("py-spy")
    cmd = [str(py_spy), "record", "--pid", str(pid), "--rate", "200", "--threads",
           "--duration", str(int(seconds)), "--format", "raw", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches; the measured window starts after
    return proc


def throughput(kind: str, base: Path, s: Settings, *, with_probe: bool = True) -> Throughput:
    """smtp-source -> MTA -> smtp-sink; end-to-end until the sink counted every message."""
    res = Throughput(kind, s.messages)
    hook = WebhookSink(base / "webhook") if kind == "relay+webhook" else None
    with Sink(procs.free_port()) as sink, hook or contextlib.nullcontext():
        mta = _start(kind, base, sink.port, s, hook)
        spy = None
        try:
            if s.profile is not None and kind.startswith("relay"):
                s.profile.parent.mkdir(parents=True, exist_ok=True)
                spy = _py_spy(mta.pid, s.profile, s.deadline(s.messages, 200))
            # The MTA that ran before may still be writing back (Postfix's queue, the
            # relay's segments): every run starts from a quiet machine.
            res.notes.append(f"machine settled in {procs.settle():.1f} s")
            cpu0 = mta.cpu_seconds()
            main0 = procs.loop_threads_cpu(mta.pid)
            t0 = time.monotonic()
            took, _ = run_smtp_source(mta.port, s.messages, s.sessions, s.size, reuse=s.reuse,
                                      timeout=s.deadline(s.messages, 20),
                                      body_file=s.body_file)
            res.ingest_seconds = took
            end = sink.wait_for(s.messages, t0 + s.deadline(s.messages, 20))
            cpu1 = mta.cpu_seconds()
            if kind.startswith("relay"):
                main1 = procs.loop_threads_cpu(mta.pid)
                res.main_thread_cpu = sum(v - main0.get(p, 0.0) for p, v in main1.items())
                res.loop_processes = sum(1 for p, v in main1.items() if v - main0.get(p, 0.0) > 0.05)
            if end is None:
                res.notes.append(f"timed out: the sink counted {sink.count}/{s.messages}")
                end = time.monotonic()
            res.seconds = end - t0
            res.cpu_seconds = cpu1 - cpu0
            if hook is not None:  # received + delivered per message: wait for all of them
                done = hook.wait_for(2 * s.messages, time.monotonic() + s.deadline(s.messages))
                res.webhook_events = hook.events
                res.webhook_lag = (done - end) if done is not None else float("nan")
                res.notes.append(f"webhook: {hook.events} events in {hook.calls} calls, "
                                 f"{hook.bad} bad signatures, {hook.gaps()} missing seqs; "
                                 f"all in {max(0.0, res.webhook_lag):.2f} s after the sink's last")
            res.rss_peak = mta.rss()[1]
            res.load = os.getloadavg()[0]
            res.notes.append(f"upstream sessions ended so far: {sink.sessions}")
            if spy is not None:
                spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
                spy.wait(60)
                spy = None
            if with_probe and s.probe_seconds > 0 and hook is None:
                rate = res.rate / 2
                res.probe_rate = rate
                before = sink.count
                res.probe = asyncio.run(probe(mta.port, rate, s.probe_seconds, s.size))
                sink.wait_for(before + res.probe.sent, time.monotonic() + s.deadline(res.probe.sent))
            if isinstance(mta, Relay):
                delivered = mta.count_events("delivered")
                deferred = mta.count_events("deferred")
                if deferred:
                    res.notes.append(f"relay deferred {deferred} deliveries")
                res.notes.append(f"relay mail log: {delivered} delivered")
        finally:
            if spy is not None:
                spy.kill()
            mta.stop()
    return res


@dataclass
class Latency:
    mta: str
    messages: int
    ceiling: float
    seconds: float = float("nan")
    steady_seconds: float = float("nan")
    load: float = float("nan")
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def steady_rate(self) -> float:
        """From the sink's first message to its last: the delivery rate itself."""
        return (self.messages - 1) / self.steady_seconds


def latency(kind: str, base: Path, s: Settings) -> Latency:
    """The upstream answers each final dot after `delay` and allows `upstream_connections`
    at once: the ceiling is connections / delay messages per second."""
    res = Latency(kind, s.latency_messages, s.upstream_connections / s.delay)
    with Sink(procs.free_port(), delay=s.delay) as sink:
        mta = _start(kind, base, sink.port, s)
        try:
            t0 = time.monotonic()
            run_smtp_source(mta.port, s.latency_messages, s.sessions, s.size, reuse=s.reuse,
                            timeout=s.deadline(s.latency_messages))
            end = sink.wait_for(s.latency_messages, t0 + s.deadline(s.latency_messages, 20))
            if end is None:
                res.notes.append(f"timed out: the sink counted {sink.count}/{s.latency_messages}")
                end = time.monotonic()
            res.seconds = end - t0
            res.steady_seconds = end - (sink.first_at or t0)
            n = s.latency_messages
            t10, t90 = time_at(sink.progress, n // 10), time_at(sink.progress, n * 9 // 10)
            if t10 is not None and t90 is not None and t90 > t10:
                rate = (n * 9 // 10 - n // 10) / (t90 - t10)
                res.notes.append(
                    f"from the 10th to the 90th percentile message: {rate:.1f} msg/s"
                    f" ({100 * rate / res.ceiling:.1f}%); the first 10% took"
                    f" {t10 - (sink.first_at or t0):.2f} s, the last 10% {end - t90:.2f} s"
                    f" (at the ceiling: {n / 10 / res.ceiling:.2f} s each)")
            res.load = os.getloadavg()[0]
        finally:
            mta.stop()
    return res


@dataclass
class Scale:
    messages: int
    ingest_seconds: float = float("nan")
    rss_after_ingest: tuple[int, int] = (0, 0)
    summary_running_seconds: float = float("nan")  # `relay queue summary`, relay up, queue full
    summary_output: str = ""
    summary_idle_seconds: list[float] = field(default_factory=list)  # once the relay is idle
    cli_import_seconds: float = float("nan")  # `python -c "import relay.cli.main"` alone
    stop_seconds: float = float("nan")
    summary_offline_seconds: float = float("nan")  # Spool.summary() on the stopped spool
    spool_bytes: int = 0
    recovery_seconds: float = float("nan")
    recovered: int | None = None
    rss_after_recovery: tuple[int, int] = (0, 0)
    summary_after_restart_seconds: float = float("nan")
    flush_seconds: float = float("nan")
    drain_seconds: float = float("nan")
    rss_after_drain: tuple[int, int] = (0, 0)
    notes: list[str] = field(default_factory=list)


def _wait_idle(relay: Relay, limit: float = 120.0) -> None:
    """Until the relay used under 5% of a core over a second (at most `limit` seconds)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        c0 = relay.cpu_seconds()
        time.sleep(1.0)
        if relay.cpu_seconds() - c0 < 0.05:
            return


def _relay_queue(relay: Relay, *args: str, timeout: float = 600) -> tuple[float, str]:
    """Time one `relay queue ...` command (whole command: interpreter start-up included)."""
    cmd = [sys.executable, "-m", "relay.cli", "queue", "-c", str(relay.dir), *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    took = time.monotonic() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-500:]}")
    return took, r.stdout


def _offline_summary(relay: Relay) -> float:
    """Spool.summary() on a stopped relay's spool (what the admin API runs), open excluded."""
    from relay.spool import Spool

    async def run() -> float:
        spool = await Spool.open(relay.dir / "spool")
        try:
            t0 = time.monotonic()
            await spool.summary()
            return time.monotonic() - t0
        finally:
            await spool.close()

    return asyncio.run(run())


def _flush(relay: Relay) -> int:
    """Make every deferred recipient due now through the Spool API, relay stopped: the
    offline equivalent of Postfix's `postqueue -f`. (`relay queue retry --all` acts on the
    oldest 1,000 messages only: the admin API's list limit.)"""
    from relay.spool import RecipientUpdate, Spool

    async def run() -> int:
        spool = await Spool.open(relay.dir / "spool")
        n = 0
        try:
            batch: list[asyncio.Future[None]] = []
            for m in spool.iter_pending():
                ups = [RecipientUpdate(r.rcpt, r.status, r.attempts, 0.0, r.last_reply)
                       for r in m.pending]
                batch.append(asyncio.ensure_future(spool.update(m.queue_id, ups)))
                n += 1
                if len(batch) >= 2000:
                    await asyncio.gather(*batch)
                    batch = []
            await asyncio.gather(*batch)
        finally:
            await spool.close()
        return n

    return asyncio.run(run())


def scale(base: Path, s: Settings) -> Scale:
    """Queue `scale_messages` while the upstream refuses connections; `relay queue summary`;
    stop; everything made due; the upstream comes back and the relay restarts: recovery
    time, RSS, `relay queue summary` again, and the drain."""
    res = Scale(s.scale_messages)
    sink_port = procs.closed_port()  # nothing listens here until the drain: refused
    os.environ.setdefault("RELAY_ADMIN_TOKEN", "bench-" + os.urandom(8).hex())
    # One failed attempt per message, then a long wait: the queue builds without a retry storm.
    relay = Relay(base / "relay-scale", sink_port, max_connections=s.upstream_connections,
                  retry_schedule=["2h"],
                  # One worker: the RSS target is about what a queued message costs, and
                  # every worker has its own interpreter (~50 MB) on top.
                  extra={"workers": 1,
                         "admin": {"enabled": True, "address": "127.0.0.1",
                                   "port": procs.free_port(), "token": "env:RELAY_ADMIN_TOKEN"}})
    relay.start(command=s.relay_command)
    try:
        t0 = time.monotonic()
        run_smtp_source(relay.port, s.scale_messages, s.sessions, s.size, reuse=True,
                        timeout=s.deadline(s.scale_messages, 100))
        res.ingest_seconds = time.monotonic() - t0
        res.rss_after_ingest = relay.rss()
        res.summary_running_seconds, res.summary_output = _relay_queue(relay, "summary")
        _wait_idle(relay)  # its last deferrals written: what an operator sees at a quiet moment
        res.summary_idle_seconds = [_relay_queue(relay, "summary")[0] for _ in range(3)]
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import relay.cli.main"], check=True)
        res.cli_import_seconds = time.monotonic() - t0
        res.stop_seconds = relay.stop()
    finally:
        relay.kill()
    res.spool_bytes = sum(p.stat().st_size for p in (relay.dir / "spool").iterdir() if p.is_file())
    res.summary_offline_seconds = _offline_summary(relay)
    t0 = time.monotonic()
    flushed = _flush(relay)
    res.flush_seconds = time.monotonic() - t0
    res.notes.append(f"made {flushed} messages due now through the Spool API, relay stopped, in "
                     f"{res.flush_seconds:.1f} s (not part of any figure)")
    with Sink(sink_port) as sink:
        relay.start(timeout=s.deadline(s.scale_messages, 1000), command=s.relay_command)
        try:
            assert relay.listening_at is not None
            res.recovery_seconds = relay.listening_at - relay.started_at
            res.recovered = relay.recovered
            res.rss_after_recovery = relay.rss()
            # While the whole queue drains at full speed.
            res.summary_after_restart_seconds, _ = _relay_queue(relay, "summary")
            end = sink.wait_for(s.scale_messages,
                                relay.listening_at + s.deadline(s.scale_messages, 50))
            if end is None:
                res.notes.append(f"drain timed out: the sink counted {sink.count}/{s.scale_messages}")
                end = time.monotonic()
            res.drain_seconds = end - relay.listening_at
            res.rss_after_drain = relay.rss()
        finally:
            relay.stop()
    return res
