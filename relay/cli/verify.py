"""`relay verify-upstream NAME --send-to ADDR | --confirm CODE | --status`: the verified
switch-over, through the running relay's admin API (it owns the state and the credentials)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from relay.cli.admin_client import AdminClient, AdminError, add_api_args
from relay.ops.probe import ProbeReport, Step


def cmd_verify_upstream(args: argparse.Namespace) -> int:
    if sum(bool(x) for x in (args.send_to, args.confirm, args.status)) != 1:
        print("relay verify-upstream: give one of --send-to ADDR, --confirm CODE, --status",
              file=sys.stderr)
        return 2
    client = None
    try:
        client = AdminClient.from_args(args)
        if args.status:
            status, data = client.call("GET", "/upstreams")
        else:
            body: dict[str, Any] = (
                {"send_to": args.send_to, "timeout": args.timeout} if args.send_to
                else {"code": args.confirm}
            )
            status, data = client.call("POST", f"/upstreams/{quote(args.name)}/verify", body)
    except AdminError as exc:
        print(f"relay verify-upstream: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    if not isinstance(data, dict):
        print(f"relay verify-upstream: {status}: {data}", file=sys.stderr)
        return 1
    if "error" in data:
        print(f"relay verify-upstream: {data['error']}", file=sys.stderr)
        return 2
    if args.json:
        return 0 if status == 200 else 1
    if args.status:
        entry = data.get("upstreams", {}).get(args.name)
        if entry is None:
            print(f"relay verify-upstream: unknown upstream '{args.name}'", file=sys.stderr)
            return 2
        v = entry.get("verification") or {}
        state = "verified" if v.get("verified") else "NOT verified"
        if not entry.get("verification"):
            state = "carries mail (no verify: true)"
        print(f"{args.name}: {state}")
        if v.get("changed_since_verified"):
            print("  its settings changed since it was verified: verify it again")
        if v.get("pending"):
            print(f"  code sent to {v['pending']['send_to']}, waiting for --confirm")
        if entry.get("previous"):
            print(f"  meanwhile its mail goes to {entry['previous']}")
        return 0 if v.get("verified") or not entry.get("verification") else 1
    if args.send_to:
        r = data["report"]
        rep = ProbeReport(**{k: v for k, v in r.items() if k not in ("steps", "ok")})
        rep.steps = [Step(**s) for s in r["steps"]]
        print(rep.as_text())
        if data.get("sent"):
            print(f"\na one-time code went to {args.send_to}; when it arrives:"
                  f"\n  relay verify-upstream {args.name} --confirm CODE")
            return 0
        print(f"\nnot sent: {args.name} stays unverified; the failed step shows the server's reply")
        return 1
    print(data.get("text", ""))
    return 0 if data.get("verified") else 1


def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser(
        "verify-upstream",
        help="verified switch-over: send a one-time code through a verify: true upstream,"
        " then confirm it to let the upstream carry mail",
    )
    sp.add_argument("name", help="the upstream id (an organisation's own: org/name)")
    add_api_args(sp)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--send-to", metavar="ADDR", help="send a test message with a code to ADDR")
    g.add_argument("--confirm", metavar="CODE", help="the code from that message: activate")
    g.add_argument("--status", action="store_true", help="verified or not, and what waits")
    sp.add_argument("--timeout", type=float, default=15.0, help="seconds per SMTP step")
    sp.add_argument("--json", action="store_true", help="print the API's answer")
    sp.set_defaults(func=cmd_verify_upstream)
