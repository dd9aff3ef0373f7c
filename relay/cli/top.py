"""`relay top`: a live terminal view of the running relay, refreshed every few seconds:
message rates, the queue by upstream, each upstream's state, workers up, the latest failures.
It reads the admin API's /status.json (the same document as the status page)."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any

from relay.cli.admin_client import AdminClient, AdminError, add_api_args
from relay.cli.common import age

CLEAR = "\x1b[H\x1b[2J"
RATES = ("received", "delivered", "deferred", "bounced")


def rates(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, float | None]:
    """Per-second rates between two status documents' totals (None: only one sample yet)."""
    if before is None:
        return dict.fromkeys(RATES)
    dt = after["generated_at"] - before["generated_at"]
    a, b = after["activity"]["totals"], before["activity"]["totals"]
    return {k: (max(0, a.get(k, 0) - b.get(k, 0)) / dt if dt > 0 else None) for k in RATES}


def frame(status: dict[str, Any], per_second: dict[str, float | None], width: int = 100) -> str:
    h = status["health"]
    q = status["queue"]
    workers = (f"workers {h['workers_up']}/{h['workers']} up" if "workers_up" in h
               else "one process")
    ready = "ready" if h.get("ready") else "NOT READY"
    when = time.strftime("%H:%M:%S", time.localtime(status["generated_at"]))
    lines = [f"egress-relay {status['hostname']}  {when}  {ready}  {workers}"
             + ("  LIMITS BACKEND DEGRADED" if h.get("limits_backend_degraded") else "")]
    shown = "  ".join(
        f"{k} {'-' if v is None else f'{v:.1f}/s'}" for k, v in per_second.items()
    )
    lines.append(f"rates      {shown}")
    lines.append(f"queue      {q['messages']} messages, {q['recipients_pending']} recipients"
                 f" pending, {q['held']} held, oldest {age(q.get('oldest_age'))}")
    lines.append("")
    lines.append(f"{'upstream':<28}{'state':<13}{'queued':>8}{'oldest':>9}{'in flight':>11}  why")
    by_up = q.get("by_upstream", {})
    for u in status["upstreams"]:
        g = by_up.get(u["id"], {})
        if u["state"] == "active" and not g and not u["in_flight"] and not u.get("routed_to"):
            continue  # an idle upstream nothing routes to
        why = u.get("reason") or ""
        lines.append(f"{u['id']:<28}{u['state']:<13}{g.get('messages', 0):>8}"
                     f"{age(g.get('oldest_age')):>9}{u['in_flight']:>11}  {why}"[:width])
    waiting = status.get("waiting", [])[:6]
    if waiting:
        lines.append("")
        lines.append("why mail waits")
        for w in waiting:
            lines.append(f"  {w['messages']:>6}  {w['kind']:<14} {w['reason']}"[:width])
    recent = status["activity"]["recent"][:5]
    if recent:
        lines.append("")
        lines.append("latest failures")
        for r in recent:
            t = time.strftime("%H:%M:%S", time.localtime(r["ts"]))
            lines.append(f"  {t} {r['event']:<9} {r.get('upstream', ''):<20} "
                         f"{r.get('recipient', '')}: {r.get('reply', '')}"[:width])
    return "\n".join(lines)


def cmd_top(args: argparse.Namespace) -> int:
    try:
        client = AdminClient.from_args(args)
    except AdminError as exc:
        print(f"relay top: {exc}", file=sys.stderr)
        return 1
    previous: dict[str, Any] | None = None
    tty = sys.stdout.isatty() and not args.once
    frames = 0
    try:
        while True:
            try:
                status, data = client.call("GET", "/status.json")
            except AdminError as exc:
                print(f"relay top: {exc}", file=sys.stderr)
                return 1
            if status != 200:
                msg = data.get("error") if isinstance(data, dict) else data
                print(f"relay top: {status}: {msg}", file=sys.stderr)
                return 1
            frames += 1
            # --once: two samples `interval` apart, so the rates are real.
            if not (args.once and frames == 1):
                width = shutil.get_terminal_size((100, 24)).columns
                text = frame(data, rates(previous, data), width)
                print((CLEAR if tty else "") + text, flush=True)
                if args.once:
                    return 0
            previous = data
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser("top", help="a live view of the running relay: rates, queue, upstreams")
    add_api_args(sp)
    sp.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    sp.add_argument("--once", action="store_true",
                    help="print one frame (after two samples, for the rates) and exit")
    sp.set_defaults(func=cmd_top)

