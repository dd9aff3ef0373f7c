"""Where the relay's CPU goes: buckets a py-spy `--format raw` profile (collapsed stacks)
by pipeline stage.

    .venv/bin/python benchmarks/run.py --skip-postfix --messages 10000 --profile /tmp/relay.txt
    .venv/bin/python benchmarks/profile_summary.py /tmp/relay.txt [--messages 10000]

Each sample goes to the first rule (in order) that matches any frame of its stack; the
order puts specific costs (mail log, logging, spool) before the stage that called them.
Shares are of the event-loop thread, the one that limits throughput; other threads are
listed apart.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

# (bucket, substrings: any frame containing one of them)
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("mail log: JSON line + metrics (events.MailLog.emit)", ("MailLog.emit",)),
    ("python logging (relay loggers, redaction)", ("Logger._log", "Logger.info",
                                                             "Logger.debug", "Logger.warning")),
    ("spool reads (read_body via to_thread)", ("Spool.read_body", "Spool._read")),
    ("spool submit from the loop (Writer.submit, futures)", ("Writer.submit", "Spool.put",
                                                             "Spool.update", "_settle")),
    ("intake: policy (attribute/route), header scan/strip", ("Intake._prepare",)),
    ("intake: other (Intake.submit, scheduler.enqueue)", ("Intake.submit",)),
    ("listener: DATA end (unstuffing, checks, Received, Envelope)", ("_end_of_data",)),
    ("listener: MAIL/RCPT (address parsing, intake checks)", ("smtp_MAIL", "smtp_RCPT")),
    ("listener: connection set-up and close", ("connection_made", "connection_lost",
                                               "_SmtpSession.__init__", "goodbye")),
    ("listener: line split, other commands, replies, socket writes", ("data_received",
                                                                      "_SmtpSession.")),
    ("delivery: connect, EHLO (new upstream sessions)", ("open_session",)),
    ("delivery: QUIT of retired pooled sessions", ("Pool._quit", "Pool.retire")),
    ("delivery: aiosmtplib transaction (MAIL/RCPT/DATA)", ("Deliverer._transaction",)),
    ("scheduler: record outcome, dispatch, workers", ("Scheduler.",)),
    ("event loop itself (uvloop C: epoll, transports, callbacks)", ("Runner.run",)),
]


def summarise(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    """(main-thread samples, main-thread buckets, other threads' samples by thread and leaf).

    Only the event-loop thread's shares are CPU: py-spy counts a thread blocked in fsync or
    in a lock wait as busy, so the other threads' samples are wall time (use the harness's
    /proc per-thread CPU for them)."""
    buckets: collections.Counter[str] = collections.Counter()
    others: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            thread = frames[0].split(":", 1)[-1].strip()
            thread = "to_thread pool" if thread.startswith("uvloop_") else thread
            others[f"{thread}: {frames[-1].split(' (')[0]}"] += n
            continue
        total += n
        for name, needles in RULES:
            if any(needle in f for f in frames for needle in needles):
                # The catch-all loop bucket only when the loop is the leaf itself.
                if name.startswith("event loop") and "Runner.run" not in frames[-1]:
                    continue
                buckets[name] += n
                break
        else:
            buckets["other"] += n
    return total, buckets, others


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path)
    ap.add_argument("--cpu-ms", type=float,
                    help="measured event-loop-thread CPU ms per message, to scale the shares")
    a = ap.parse_args()
    total, buckets, others = summarise(a.profile)
    print(f"event-loop thread: {total} samples")
    for name, n in buckets.most_common():
        share = n / total
        extra = f"  ~{share * a.cpu_ms:.3f} ms/msg" if a.cpu_ms else ""
        print(f"{100 * share:5.1f}%  {name}{extra}")
    print("other threads (wall time, not CPU: fsync and lock waits count as busy):")
    for name, n in others.most_common(8):
        print(f"{n:7d}  {name}")


if __name__ == "__main__":
    main()
