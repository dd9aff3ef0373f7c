"""The benchmark command: the relay beside Postfix on one machine, in one run.

    .venv/bin/python benchmarks/run.py                         # throughput, relay vs Postfix
    .venv/bin/python benchmarks/run.py --scenario all
    .venv/bin/python benchmarks/run.py --messages 2000 --scale-messages 20000 --scenario all

See benchmarks/README.md for the workload, what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import mime, procs
from benchmarks.scenarios import Settings, Throughput, latency, scale, throughput

INSTALL = """\
Missing: {missing}. The benchmark needs Debian's postfix package (smtp-source, smtp-sink and
the comparison instance), installed without configuring the default instance:

  echo "postfix postfix/main_mailer_type select No configuration" | sudo debconf-set-selections
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y postfix
"""


def check_tools(need_postfix: bool) -> None:
    missing = [t for t in ("smtp-source", "smtp-sink") if shutil.which(t) is None]
    if need_postfix:
        if shutil.which("postfix") is None:
            missing.append("postfix")
        elif not Path("/usr/lib/postfix/sbin/master").exists():
            missing.append("/usr/lib/postfix/sbin/master")
        if os.geteuid() != 0:
            sys.exit("the Postfix comparison instance needs root (its daemons drop to the "
                     "postfix user); run as root or pass --skip-postfix")
    if missing:
        sys.exit(INSTALL.format(missing=", ".join(missing)))
    try:
        import relay  # noqa: F401
    except ImportError:
        sys.exit("the relay package is not importable: run with the project's .venv/bin/python")


def machine() -> dict[str, str]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu if ln.startswith("Model name")), "?")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return {"cpus": str(os.cpu_count()), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "commit": commit or "?"}


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def print_throughput(runs: list[Throughput]) -> None:
    print("\n== throughput: smtp-source -> MTA -> smtp-sink (end-to-end, durable) ==")
    print(f"{'mta':13} {'messages':>8} {'seconds':>8} {'msg/s':>8} {'ingest s':>9} "
          f"{'CPU ms/msg':>10} {'peak RSS MB':>11} {'load1':>5}")
    for r in runs:
        # A process tree's summed RSS counts shared pages many times: shown for the relay only.
        rss = f"{r.rss_peak / 2**20:11.1f}" if r.mta.startswith("relay") else f"{'-':>11}"
        print(f"{r.mta:13} {r.messages:8d} {r.seconds:8.2f} {r.rate:8.0f} {r.ingest_seconds:9.2f} "
              f"{r.cpu_ms:10.3f} {rss} {r.load:5.1f}")
    relays = [r for r in runs if r.mta == "relay"]
    pfs = [r for r in runs if r.mta == "postfix"]
    for a, b in zip(relays, pfs, strict=False):
        print(f"ratio relay/postfix: throughput {a.rate / b.rate:.2f}x, "
              f"CPU per message {a.cpu_ms / b.cpu_ms:.2f}x")
    for r in runs:
        if r.probe is not None:
            p = r.probe
            print(f"{r.mta}: final dot -> 250 at {r.probe_rate:.0f} msg/s (half its rate), "
                  f"{p.sent} sent, {p.failed} failed, {p.behind} late starts: "
                  f"p50 {ms(p.quantile(0.5))} ms, p99 {ms(p.quantile(0.99))} ms, "
                  f"max {ms(max(p.latencies, default=float('nan')))} ms")
        if r.mta.startswith("relay"):
            print(f"  {r.mta}: event-loop threads {1000 * r.main_thread_cpu / r.messages:.3f} ms/msg "
                  f"({100 * r.main_thread_cpu / r.seconds / max(1, r.loop_processes):.0f}% of one core in "
                  f"each of {r.loop_processes} busy processes); other threads "
                  f"(spool writer, readers) {1000 * (r.cpu_seconds - r.main_thread_cpu) / r.messages:.3f} ms/msg")
        for n in r.notes:
            print(f"  {r.mta}: {n}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["throughput", "large", "latency", "scale", "all"],
                    default="throughput")
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=5_000, help="payload bytes per message")
    ap.add_argument("--upstream-connections", type=int, default=20,
                    help="concurrent connections to the sink (relay max_connections, Postfix "
                         "default_destination_concurrency_limit)")
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d: reuse client connections")
    ap.add_argument("--mime", action="store_true",
                    help="send a realistic MIME message of --size bytes (76-character lines, "
                         "a base64 attachment) instead of smtp-source's -l payload")
    ap.add_argument("--large-sizes", default="100000:4000,1000000:400",
                    help="the large scenario: SIZE:MESSAGES pairs, MIME bodies")
    ap.add_argument("--repeat", type=int, default=1, help="throughput runs per MTA, alternating")
    ap.add_argument("--probe-seconds", type=float, default=10.0, help="0 skips the p99 probe")
    ap.add_argument("--latency-messages", type=int, default=4_000)
    ap.add_argument("--scale-messages", type=int, default=200_000)
    ap.add_argument("--skip-postfix", action="store_true")
    ap.add_argument("--workers", default="auto",
                    help="the relay's worker processes for throughput and latency (scale uses 1)")
    ap.add_argument("--webhook", choices=["off", "on", "ab"], default="off",
                    help="throughput: the relay posts every event to a local HTTPS webhook "
                         "(on), or each repeat runs the relay without then with it (ab)")
    ap.add_argument("--profile", type=Path, help="py-spy raw profile of the relay's throughput run")
    ap.add_argument("--relay-command", type=shlex.split,
                    help="run the relay with this instead of `python -m relay.cli` (A/B a patch)")
    ap.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                    help="spools and queues go here (must be a real disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    a = ap.parse_args(argv)

    check_tools(need_postfix=not a.skip_postfix)
    fs = procs.filesystem_type(a.workdir)
    if fs in ("tmpfs", "ramfs"):
        sys.exit(f"{a.workdir} is on {fs}: fsync would be free; pass --workdir on a real disk")
    s = Settings(messages=a.messages, sessions=a.sessions, size=a.size,
                 upstream_connections=a.upstream_connections, reuse=a.reuse,
                 probe_seconds=a.probe_seconds, latency_messages=a.latency_messages,
                 scale_messages=a.scale_messages, workdir=a.workdir, profile=a.profile,
                 relay_command=a.relay_command,
                 workers=int(a.workers) if a.workers.isdigit() else a.workers,
                 webhook=a.webhook)
    relays = {"off": ["relay"], "on": ["relay+webhook"], "ab": ["relay", "relay+webhook"]}
    kinds = relays[a.webhook] + ([] if a.skip_postfix else ["postfix"])
    info = machine()
    print(f"machine: {info['cpus']} CPUs, {info['cpu']}, Python {info['python']}, "
          f"kernel {info['kernel']}, commit {info['commit']}, scratch on {fs}, "
          f"load average {os.getloadavg()[0]:.1f} (the figures assume an otherwise idle machine)")
    out: dict[str, Any] = {"machine": info, "settings": {k: str(v) for k, v in asdict(s).items()}}
    base = Path(tempfile.mkdtemp(prefix="relay-bench-", dir=a.workdir))
    base.chmod(0o755)  # Postfix's unprivileged daemons traverse it
    if a.mime:
        s.body_file = mime.write(base, a.size)
    started = time.monotonic()
    try:
        if a.scenario in ("throughput", "all"):
            runs: list[Throughput] = []
            for i in range(a.repeat):
                for j, k in enumerate(kinds):
                    runs.append(throughput(k, base / f"tp-{i}-{j}", s))
            print_throughput(runs)
            out["throughput"] = [asdict(r) | {"rate": r.rate, "cpu_ms": r.cpu_ms} for r in runs]
        if a.scenario == "large":
            # Each size beside Postfix, interleaved; no p99 probe (its messages are small).
            large: list[Throughput] = []
            for pair in a.large_sizes.split(","):
                size, _, count = pair.partition(":")
                ls = replace(s, size=int(size), messages=int(count), probe_seconds=0,
                             body_file=mime.write(base, int(size)))
                runs = []
                for i in range(a.repeat):
                    for k in kinds:
                        runs.append(throughput(k, base / f"large-{size}-{i}", ls))
                print(f"\n-- {int(size):,}-byte MIME messages --", end="")
                print_throughput(runs)
                large += runs
            out["large"] = [asdict(r) | {"rate": r.rate, "cpu_ms": r.cpu_ms} for r in large]
        if a.scenario in ("latency", "all"):
            print(f"\n== latency-bound upstream: {s.delay * 1000:.0f} ms per transaction, "
                  f"{s.upstream_connections} connections ==")
            lat = []
            for k in [k for k in kinds if k != "relay+webhook"]:
                r = latency(k, base / "lat", s)
                lat.append(r)
                print(f"{k:8} {r.messages} messages in {r.seconds:.2f} s: {r.rate:.1f} msg/s "
                      f"({100 * r.rate / r.ceiling:.1f}% of {r.ceiling:.0f}); from first delivery: "
                      f"{r.steady_rate:.1f} msg/s ({100 * r.steady_rate / r.ceiling:.1f}%); "
                      f"load {r.load:.1f}")
                for n in r.notes:
                    print(f"  {k}: {n}")
            out["latency"] = [asdict(r) for r in lat]
        if a.scenario in ("scale", "all"):
            print(f"\n== scale: {s.scale_messages} messages queued while the upstream is down ==")
            sc = scale(base, s)
            mb = 2**20
            print(f"ingest (smtp-source -d, upstream refusing): {sc.ingest_seconds:.1f} s "
                  f"({sc.messages / sc.ingest_seconds:.0f} msg/s); RSS {sc.rss_after_ingest[0] / mb:.0f} MB "
                  f"(peak {sc.rss_after_ingest[1] / mb:.0f} MB); spool {sc.spool_bytes / mb:.0f} MB")
            print(f"`relay queue summary` with the queue full: {ms(sc.summary_running_seconds)} ms "
                  f"(whole command); Spool.summary() on the stopped spool: "
                  f"{ms(sc.summary_offline_seconds)} ms; SIGTERM -> exit {sc.stop_seconds:.1f} s")
            idle = ", ".join(ms(x) for x in sc.summary_idle_seconds)
            print(f"`relay queue summary` once the relay is idle: {idle} ms (whole command; "
                  f"importing relay.cli.main alone: {ms(sc.cli_import_seconds)} ms)")
            print(f"restart recovery (start -> listening, 'recovered {sc.recovered} unfinished "
                  f"messages'): {sc.recovery_seconds:.1f} s; RSS after recovery "
                  f"{sc.rss_after_recovery[0] / mb:.0f} MB; `relay queue summary` while it drains: "
                  f"{ms(sc.summary_after_restart_seconds)} ms")
            print(f"drain (listening -> the sink counted every message): "
                  f"{sc.drain_seconds:.1f} s ({sc.messages / sc.drain_seconds:.0f} msg/s); RSS "
                  f"{sc.rss_after_drain[0] / mb:.0f} MB (peak {sc.rss_after_drain[1] / mb:.0f} MB)")
            for n in sc.notes:
                print(f"  {n}")
            out["scale"] = asdict(sc)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
