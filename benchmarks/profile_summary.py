"""Where the relay's CPU goes: buckets a py-spy `--format raw` profile (collapsed stacks)
by pipeline stage.

    .venv/bin/python benchmarks/run.py --skip-postfix --messages 10000 --profile /tmp/relay.txt
    .venv/bin/python benchmarks/profile_summary.py /tmp/relay.txt [--messages 10000]

Each sample goes to the first rule (in order) that matches any frame of its stack; the
order puts specific costs (mail log, logging, spool) before the stage that called them.
Leaf samples in a thread pool's `_worker` are a thread blocked in `queue.get` (py-spy does
not always see a lock wait as idle) and are reported apart.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

# (bucket, substrings: any frame containing one of them)
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("spool writer thread: SQLite inserts/updates, COMMIT", ("spool-writer",)),
    ("mail log: JSON line + metrics (events.MailLog.emit)", ("MailLog.emit",)),
    ("python logging (relay/aiosmtpd loggers, redaction)", ("Logger._log", "Logger.info",
                                                             "Logger.debug", "Logger.warning")),
    ("spool reads (read_body via to_thread)", ("Spool.read_body", "Spool._read")),
    ("spool submit from the loop (Writer.submit, futures)", ("Writer.submit", "Spool.put",
                                                             "Spool.update", "_settle")),
    ("intake: policy (attribute/route), header scan/strip", ("Intake._prepare",)),
    ("intake: other (Intake.submit, scheduler.enqueue)", ("Intake.submit",)),
    ("listener: aiosmtpd session set-up (SMTP.__init__, inspect)", ("SMTP.__init__",)),
    ("listener: DATA read (dot-unstuffing, size checks)", ("_read_data",)),
    ("listener: aiosmtpd commands, replies, socket writes", ("_handle_client", "SMTP.push",
                                                            "connection_made", "connection_lost")),
    ("delivery: connect, EHLO (new upstream sessions)", ("open_session",)),
    ("delivery: QUIT of retired pooled sessions", ("Pool._quit", "Pool.retire")),
    ("delivery: aiosmtplib transaction (MAIL/RCPT/DATA)", ("Deliverer._transaction",)),
    ("scheduler: record outcome, dispatch, workers", ("Scheduler.",)),
    ("idle pool threads (lock waits seen as busy)", ("concurrent/futures/thread.py",)),
    ("event loop itself (uvloop C: epoll, transports, callbacks)", ("Runner.run",)),
]


def summarise(path: Path) -> tuple[int, collections.Counter[str]]:
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        total += n
        frames = stack.split(";")
        for name, needles in RULES:
            if any(needle in f for f in frames for needle in needles):
                # The catch-all loop bucket only when the loop is the leaf itself.
                if name.startswith("event loop") and "Runner.run" not in frames[-1]:
                    continue
                if name.startswith("idle pool") and "_worker" not in frames[-1]:
                    continue
                buckets[name] += n
                break
        else:
            buckets["other"] += n
    return total, buckets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--cpu-ms", type=float, help="measured CPU ms per message, to scale the shares")
    a = ap.parse_args()
    total, buckets = summarise(a.profile)
    idle = buckets.pop("idle pool threads (lock waits seen as busy)", 0)
    busy = total - idle
    print(f"{busy} busy samples ({idle} idle pool-thread samples left out)")
    for name, n in buckets.most_common():
        share = n / busy
        extra = f"  ~{share * a.cpu_ms:.2f} ms/msg" if a.cpu_ms else ""
        print(f"{100 * share:5.1f}%  {name}{extra}")


if __name__ == "__main__":
    main()
