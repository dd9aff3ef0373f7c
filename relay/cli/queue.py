"""`relay queue` and `relay reload`: act on the running relay (which owns the spool) through
its admin API (`relay reload` falls back to SIGHUP when the API is disabled)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from relay.cli.admin_client import AdminClient, AdminError, add_api_args
from relay.cli.common import age, load_or_report
from relay.config.model import Config
from relay.ops.shape import render as render_shape
from relay.runtime.supervisor import running_supervisor


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "org": args.org,
        "account": args.account,
        "upstream": args.upstream,
        "older_than": args.older_than,
    }


def _print_summary(s: dict[str, Any]) -> None:
    print(
        f"{s['messages']} messages, {s['recipients_pending']} recipients pending,"
        f" {s['held']} held; oldest {age(s.get('oldest_age'))}"
    )
    for title, key in (("upstream", "by_upstream"), ("organisation", "by_org")):
        groups = s.get(key) or {}
        if not groups:
            continue
        print(f"\n{'by ' + title:<28} {'messages':>8} {'rcpts':>7} {'held':>5} {'oldest':>8}")
        for name, g in sorted(groups.items()):
            print(
                f"{name:<28} {g['messages']:>8} {g['recipients_pending']:>7} {g['held']:>5}"
                f" {age(g.get('oldest_age')):>8}"
            )
    waiting = s.get("waiting") or []
    if waiting:
        print(f"\n{'why they wait':<28} {'messages':>8}")
        for w in waiting:
            print(f"{w['kind']:<28} {w['messages']:>8}  {w['reason']}")
    _print_paused(s.get("paused_upstreams") or {})


def _print_paused(paused: dict[str, Any]) -> None:
    for name, p in sorted(paused.items()):
        when = "until fixed" if p.get("until_fixed") else "for now"
        print(f"\nPAUSED {name} ({p['kind']}, {when}; looked at again in {age(p.get('retry_in'))}):"
              f"\n  reply:     {p['reason']}\n  next step: {p['next_step']}")


def _print_list(messages: list[dict[str, Any]]) -> None:
    if not messages:
        print("no messages match")
        return
    print(f"{'queue id':<22} {'age':>6} {'org':<14} {'upstream':<20} {'rcpts':>5}  why it waits")
    for m in messages:
        held = " HELD" if m["held"] else ""
        why = m.get("waiting") or {}
        reply = (why.get("reason") or m.get("last_reply") or "")[:100]
        print(
            f"{m['queue_id']:<22} {age(m['age']):>6} {m['org']:<14} {m['upstream']:<20}"
            f" {len(m['pending']):>5}{held}  {reply}"
        )


def _print_show(m: dict[str, Any]) -> None:
    for key in (
        "queue_id",
        "sender",
        "org",
        "account",
        "upstream",
        "client",
        "size",
        "held",
        "is_dsn",
    ):
        print(f"{key + ':':<12} {m[key]}")
    print(f"{'age:':<12} {age(m['age'])}")
    sched = m.get("scheduler")
    if sched:
        print(f"{'state:':<12} {sched['state']}")
    why = m.get("waiting")
    if why:
        print(f"{'waiting:':<12} {why['reason']}")
    print("recipients:")
    for r in m["recipients"]:
        print(
            f"  {r['recipient']}  {r['status']}  attempts={r['attempts']}  {r['last_reply'] or ''}"
        )
    print("headers:")
    for line in m.get("headers", "").splitlines():
        print(f"  {line}")


def cmd_queue(args: argparse.Namespace) -> int:
    try:
        client = AdminClient.from_args(args)
        action = args.action or "summary"
        if action == "summary":
            status, data = client.call("GET", "/queue")
        elif action == "list":
            status, data = client.call(
                "GET", "/queue/messages", query={**_filters(args), "limit": args.limit}
            )
        elif action == "show":
            status, data = client.call("GET", f"/queue/messages/{urllib.parse.quote(args.ids[0])}")
        elif action == "shape":
            status, data = client.call("GET", "/queue/shape", query={"by": args.by})
        else:
            body: dict[str, Any] = {"action": action, **_filters(args)}
            if args.ids:
                body["ids"] = args.ids
            elif all(v is None for v in _filters(args).values()) and not args.all:
                print(
                    "give queue ids, a filter (--org, --account, --upstream, --older-than)"
                    " or --all",
                    file=sys.stderr,
                )
                return 2
            body["all"] = args.all
            if getattr(args, "reason", None):
                body["reason"] = args.reason
            status, data = client.call("POST", "/queue/actions", body)
    except AdminError as exc:
        print(f"relay queue: {exc}", file=sys.stderr)
        return 1
    if status >= 400:
        msg = data.get("error") if isinstance(data, dict) else data
        print(f"relay queue: {status}: {msg}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    elif action == "summary":
        _print_summary(data)
    elif action == "list":
        _print_list(data["messages"])
    elif action == "show":
        _print_show(data)
    elif action == "shape":
        print(render_shape(data))
    else:
        for qid, r in data["results"].items():
            print(f"{qid}: {r['result']}: {r['text']}")
        print(
            f"{action}: {data['matched']} matched, "
            + ", ".join(f"{n} {k}" for k, n in sorted(data["counts"].items()))
        )
    if action in ("retry", "hold", "release", "delete", "bounce"):
        return 0 if data["matched"] and set(data["counts"]) == {"ok"} else 1
    return 0


# -- relay reload ---------------------------------------------------------------------------


def cmd_reload(args: argparse.Namespace) -> int:
    if args.config:
        # Validate here first: a configuration that does not load is never sent for.
        config = load_or_report(args.config)
        if config is None:
            print("reload refused: the previous configuration keeps running", file=sys.stderr)
            return 1
        if not config.relay.admin.enabled and args.url is None:
            return _reload_by_signal(config)
    try:
        status, data = AdminClient.from_args(args).call("POST", "/reload")
    except AdminError as exc:
        print(f"relay reload: {exc}", file=sys.stderr)
        return 1
    if status == 200:
        for w in data.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
        print("reloaded: the new configuration is in effect")
        return 0
    if isinstance(data, dict) and "errors" in data:
        for e in data["errors"]:
            print(e, file=sys.stderr)
        print("reload refused: the previous configuration keeps running", file=sys.stderr)
    else:
        print(f"relay reload: {status}: {data}", file=sys.stderr)
    return 1


def _reload_by_signal(config: Config) -> int:
    """Without the admin API: validate here, then SIGHUP the supervisor (workers > 1) or the
    process that holds the spool."""
    lock = config.spool_path / "spool.lock"
    try:
        pid = running_supervisor(config.spool_path) or int(lock.read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        print(f"relay reload: no running relay found through {lock}: {exc}", file=sys.stderr)
        return 1
    print(
        f"configuration valid; sent SIGHUP to relay process {pid} (the admin API is disabled:"
        " see its log for the outcome)"
    )
    return 0




def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser("queue", help="the running relay's queue: summary, list, show and actions")
    add_api_args(sp)
    sp.add_argument("--json", action="store_true")
    qsub = sp.add_subparsers(dest="action")
    qsub.add_parser("summary", help="counts by upstream and organisation (default)")
    for name, text in (
        ("list", "queued messages, oldest first"),
        ("show", "one message: recipients, state, headers"),
        ("shape", "age distribution by upstream or organisation (like Postfix's qshape)"),
        ("retry", "attempt delivery now"),
        ("hold", "no delivery until released"),
        ("release", "undo hold"),
        ("delete", "remove without a DSN"),
        ("bounce", "return to the sender with a DSN"),
    ):
        qp = qsub.add_parser(name, help=text)
        if name == "show":
            qp.add_argument("ids", nargs=1, metavar="QUEUE_ID")
        elif name == "shape":
            qp.add_argument("--by", choices=["upstream", "org"], default="upstream")
        else:
            if name != "list":
                qp.add_argument("ids", nargs="*", metavar="QUEUE_ID")
                qp.add_argument("--all", action="store_true", help="every queued message")
            qp.add_argument("--org")
            qp.add_argument("--account")
            qp.add_argument("--upstream")
            qp.add_argument("--older-than", help="age, e.g. 30m, 2h, 1d")
        if name == "list":
            qp.add_argument("--limit", type=int, default=100)
        if name == "bounce":
            qp.add_argument("--reason", help="text for the DSN (after 5.0.0)")
        qp.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    sp.set_defaults(
        func=cmd_queue,
        ids=[],
        all=False,
        org=None,
        account=None,
        upstream=None,
        older_than=None,
        limit=100,
    )

    sp = sub.add_parser("reload", help="reload the running relay's configuration (validated first)")
    add_api_args(sp)
    sp.set_defaults(func=cmd_reload)
