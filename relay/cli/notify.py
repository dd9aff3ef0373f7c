"""`relay events`, `relay trace` and `relay suppression`: what the platform is told, seen
and managed through the running relay's admin API (docs/openapi.yaml)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from relay.cli.admin_client import AdminClient, AdminError, add_api_args
from relay.cli.common import age
from relay.config.units import parse_duration


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _reply(r: dict[str, Any] | None) -> str:
    return "" if not r else f"{r.get('code')} {r.get('text', '')}"


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None,
          query: dict[str, Any] | None = None) -> tuple[int, Any] | None:
    try:
        return AdminClient.from_args(args).call(method, path, body, query)
    except AdminError as exc:
        print(f"relay {args.command}: {exc}", file=sys.stderr)
        return None


def _fail(args: argparse.Namespace, status: int, data: Any) -> int:
    msg = data.get("error") if isinstance(data, dict) else data
    print(f"relay {args.command}: {status}: {msg}", file=sys.stderr)
    return 1


def _ask(args: argparse.Namespace, method: str, path: str, body: Any = None,
         query: dict[str, Any] | None = None, *, ok: tuple[int, ...] = (200,)
         ) -> tuple[int, Any] | None:
    """The admin API's answer when its status is one of `ok`; else None, the error printed."""
    got = _call(args, method, path, body, query)
    if got is not None and got[0] not in ok:
        _fail(args, *got)
        return None
    return got


def _print_event(e: dict[str, Any]) -> None:
    extra = " ".join(f"{k}={e[k]}" for k in ("upstream", "attempt", "class", "operator")
                     if e.get(k) is not None)
    print(f"{_when(e.get('ts'))} {e.get('type', ''):<11} {e.get('queue_id', '') or '-':<17}"
          f" {e.get('org', ''):<12} {e.get('recipient', '') or '-':<28} {extra}"
          f" {_reply(e.get('reply'))}".rstrip())


def cmd_events(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        since = None if args.since is None else _since(args.since)
        got = _ask(args, "GET", "/events", query={
            "since": since, "type": args.type, "org": args.org, "limit": args.limit,
            "after": args.after})
        if got is None:
            return 1
        _, data = got
        if args.json:
            print(json.dumps(data, indent=2))
        elif not data["events"]:
            print("no events match")
        for e in [] if args.json else data["events"]:
            _print_event(e)
        return 0
    if action == "outbox":
        got = _ask(args, "GET", "/events/outbox")
        if got is None:
            return 1
        _, data = got
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        if not data["endpoints"]:
            print("no webhook endpoints configured")
        for ep in data["endpoints"]:
            print(f"{ep['endpoint']}: {ep['url']}  depth {ep['depth']}, oldest"
                  f" {age(ep.get('oldest_age'))}, dropped {ep['dropped']}, failures in a row"
                  f" {ep['failures']}; last success {_when(ep.get('last_success_at'))}")
            if ep.get("last_error"):
                print(f"  last error {_when(ep.get('last_error_at'))}: {ep['last_error']}")
        return 0
    # replay
    if (args.since is None) == (args.event_id is None):
        print("relay events replay: give --since (a time or an age) or --event-id",
              file=sys.stderr)
        return 2
    body: dict[str, Any] = {"endpoint": args.endpoint}
    if args.event_id:
        body["event_id"] = args.event_id
    else:
        body["since"] = _since(args.since)
    got = _ask(args, "POST", "/events/replay", body)
    if got is None:
        return 1
    _, data = got
    print(json.dumps(data, indent=2) if args.json else "replay scheduled: the events go out again")
    return 0


def _since(text: str) -> float:
    """A unix time, an ISO date-time (UTC unless it says otherwise) or an age (2h, 3d)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
        return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
    except ValueError:
        pass
    return time.time() - parse_duration(text)


def cmd_trace(args: argparse.Namespace) -> int:
    got = _ask(args, "GET", "/trace", query={"q": args.query}, ok=(200, 404))
    if got is None:
        return 1
    status, data = got
    if status == 404:
        print(f"nothing known about {args.query} (events are kept for events.retention)")
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for t in data["messages"]:
        print(f"message {t['queue_id']}  Message-ID {t.get('message_id') or '-'}  org {t['org']}"
              f"{'  (still queued)' if t.get('queued') else ''}")
        rec = t.get("received")
        if rec:
            print(f"  {_when(rec.get('ts'))} received from {rec.get('client')} on listener"
                  f" {rec.get('listener') or '-'} (tls: {rec.get('tls') or 'no'}), sender"
                  f" {rec.get('sender') or '<>'}, {len(rec.get('recipients') or [])} recipient(s)")
            print(f"      attributed: {rec.get('attributed_by')}; routed to {rec.get('upstream')}:"
                  f" {rec.get('routed_by')}")
        for e in t["events"]:
            if e["type"] == "received":
                continue
            where = " ".join(f"{k}={e[k]}" for k in ("upstream", "egress", "tls", "attempt",
                                                   "class", "operator") if e.get(k))
            print(f"  {_when(e.get('ts'))} {e['type']:<10} {e.get('recipient') or '':<28}"
                  f" {where} {_reply(e.get('reply'))}".rstrip())
            hooks = e.get("webhooks") or {}
            if hooks.get("sent") or hooks.get("waiting"):
                print(f"      webhooks: sent to {', '.join(hooks['sent']) or '-'};"
                      f" waiting for {', '.join(hooks['waiting']) or '-'}")
        for rcpt, st in t["recipients"].items():
            print(f"  final {rcpt}: {st['status']} {_reply(st.get('reply'))}".rstrip())
        if t.get("dsn"):
            d = t["dsn"]
            print(f"  DSN {d.get('queue_id')} via {d.get('upstream')}: {d.get('status')}")
    return 0


def cmd_suppression(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action in ("list", "export"):
        query = {"org": args.org, "format": "csv" if action == "export" else None}
        got = _ask(args, "GET", "/suppression", query=query)
        if got is None:
            return 1
        _, data = got
        if action == "export" or args.json:
            print(data if isinstance(data, str) else json.dumps(data, indent=2), end="")
            return 0
        if not data["entries"]:
            print("no suppressed recipients")
        for s in data["entries"]:
            until = _when(s.get("expires_at")) if s.get("expires_at") else "until removed"
            print(f"{s['org']:<12} {s['recipient']:<32} since {_when(s['created_at'])}"
                  f" ({until})  {s['reason']}")
        return 0
    if action == "add":
        got = _ask(args, "POST", "/suppression", {
            "org": args.org, "recipient": args.recipient, "reason": args.reason,
            "duration": args.duration}, ok=(200, 201))
    else:
        path = "/suppression/" + "/".join(urllib.parse.quote(x, safe="")
                                          for x in (args.org, args.recipient))
        got = _ask(args, "DELETE", path)
    if got is None:
        return 1
    _, data = got
    print(json.dumps(data, indent=2) if args.json else f"{action}: {args.recipient} for {args.org}")
    return 0


def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser("events", help="the event log, webhook outboxes, and replay")
    add_api_args(sp)
    sp.add_argument("action", nargs="?", choices=["list", "outbox", "replay"])
    sp.add_argument("--since", help="list/replay from: unix time, ISO time or an age (2h)")
    sp.add_argument("--after", type=int, help="list: events after this seq (one shard)")
    sp.add_argument("--event-id", help="replay: from this event on")
    sp.add_argument("--endpoint", help="replay: only this endpoint (default: all)")
    sp.add_argument("--type", help="list: comma-separated event types")
    sp.add_argument("--org")
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_events)

    sp = sub.add_parser("trace", help="what happened to a message: QUEUE_ID, MESSAGE_ID or RECIPIENT")
    add_api_args(sp)
    sp.add_argument("query")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_trace)

    sp = sub.add_parser("suppression", help="suppressed recipients: list, add, remove, export")
    add_api_args(sp)
    sp.add_argument("action", nargs="?", choices=["list", "add", "remove", "export"])
    sp.add_argument("--org", help="organisation (required for add and remove)")
    sp.add_argument("--recipient")
    sp.add_argument("--reason")
    sp.add_argument("--duration", help="add: for how long (30d); default until removed")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_suppression_checked)


def _suppression_checked(args: argparse.Namespace) -> int:
    if args.action in ("add", "remove") and not (args.org and args.recipient):
        print(f"relay suppression {args.action}: needs --org and --recipient", file=sys.stderr)
        return 2
    return cmd_suppression(args)
