"""`relay test-upstream` (connect, TLS, AUTH from the relay's own egress source, here or
inside the running relay with `--api`) and `relay check-domain` (SPF, DMARC, DKIM)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from relay.cli import shell
from relay.cli.admin_client import AdminClient, AdminError
from relay.cli.common import load_or_report
from relay.delivery import DnsResolver
from relay.ops.domaincheck import DnsTxtResolver, StaticTxtResolver, TxtResolver, check_domain
from relay.ops.probe import (
    ProbeReport,
    Step,
    TargetError,
    adhoc_upstream,
    configured_upstream,
    probe,
    sources_for,
)

ADHOC_KEYS = {
    "host": "host",
    "port": "port",
    "tls": "tls",
    "username": "username",
    "password_ref": "password",
    "from_address": "from_address",
    "ca_file": "ca_file",
    "allow_plaintext": "allow_plaintext",
    "allow_tls_port_mismatch": "allow_tls_port_mismatch",
}


def _adhoc(args: argparse.Namespace) -> dict[str, Any]:
    desc = {
        key: getattr(args, attr)
        for attr, key in ADHOC_KEYS.items()
        if getattr(args, attr) not in (None, False)
    }
    if args.no_verify:
        desc["verify_tls"] = False
    return desc


def cmd_test_upstream(args: argparse.Namespace) -> int:
    desc = _adhoc(args)
    if bool(args.name) == bool(desc):
        print(
            "give an upstream NAME, or describe a server with --host, --port, --tls, ...",
            file=sys.stderr,
        )
        return 2
    options = {"mail_from": args.mail_from, "rcpt_to": args.rcpt_to, "send_to": args.send_to}
    if args.api:
        return _test_via_api(args, desc, options)
    config = load_or_report(args.config)
    if config is None:
        return 1
    try:
        upstream = (
            configured_upstream(config, args.name) if args.name else adhoc_upstream(config, desc)
        )
        sources = sources_for(
            config, upstream, pool=args.pool, source=args.source, all_sources=args.all_sources
        )
    except TargetError as exc:
        print(f"relay test-upstream: {exc}", file=sys.stderr)
        return 2
    resolver = DnsResolver(config.relay.dns.hosts, lifetime=config.relay.dns.timeout)

    async def run_all() -> list[Any]:
        return [
            await probe(upstream, s, resolver, timeout=args.timeout, **options) for s in sources
        ]

    reports = asyncio.run(run_all())
    if args.json:
        print(
            json.dumps(
                {"ok": all(r.ok for r in reports), "reports": [r.as_dict() for r in reports]},
                indent=2,
            )
        )
    else:
        print("\n\n".join(r.as_text() for r in reports))
    ok = all(r.ok for r in reports)
    if ok and args.name:
        _tell_the_running_relay(args, upstream.id)
    return 0 if ok else 1


def _tell_the_running_relay(args: argparse.Namespace, name: str) -> None:
    """A test that succeeded here ends the running relay's pause of this upstream, if it
    has one and its admin API answers (best effort: the test's result stands either way)."""
    try:
        client = AdminClient.from_args(args)
        client.timeout = 5.0
        status, data = client.call("POST", f"/upstreams/{quote(name, safe='/')}/resume")
    except AdminError:
        return
    if status == 200 and isinstance(data, dict) and data.get("was_paused"):
        print(f"the running relay was holding {name}'s mail (paused); it goes now",
              file=sys.stderr)


def _test_via_api(args: argparse.Namespace, desc: dict[str, Any], options: dict[str, Any]) -> int:
    body: dict[str, Any] = {
        **desc,
        **{k: v for k, v in options.items() if v},
        "pool": args.pool,
        "source": args.source,
        "all_sources": args.all_sources,
        "timeout": args.timeout,
    }
    if args.name:
        body["upstream"] = args.name
    try:
        status, data = AdminClient.from_args(args).call(
            "POST", "/test-upstream", {k: v for k, v in body.items() if v is not None}
        )
    except AdminError as exc:
        print(f"relay test-upstream: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        msg = data.get("error") if isinstance(data, dict) else data
        print(f"relay test-upstream: {status}: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        texts = []
        for r in data["reports"]:
            rep = ProbeReport(**{k: v for k, v in r.items() if k not in ("steps", "ok")})
            rep.steps = [Step(**s) for s in r["steps"]]
            texts.append(rep.as_text())
        print("\n\n".join(texts))
    return 0 if data["ok"] else 1


# -- relay check-domain ---------------------------------------------------------------------


def cmd_check_domain(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 1
    resolver: TxtResolver
    if args.records:
        try:
            resolver = StaticTxtResolver(json.loads(Path(args.records).read_text()))
        except (OSError, ValueError) as exc:
            print(f"relay check-domain: cannot read {args.records}: {exc}", file=sys.stderr)
            return 2
    else:
        resolver = DnsTxtResolver(args.nameserver or None)
    report = asyncio.run(check_domain(config, args.domain, resolver))
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.as_text())
    return 0 if report.ok else 1




def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser(
        "test-upstream",
        help="connect, TLS, AUTH (and optionally MAIL/RCPT or a test message)"
        " from the relay's egress source, step by step",
    )
    sp.add_argument("name", nargs="?", help="a configured upstream id (org-own ones: org/name)")
    shell.complete_directory(sp.add_argument("-c", "--config", help="configuration directory"))
    g = sp.add_argument_group("an ad-hoc server, not yet in a policy")
    g.add_argument("--host")
    g.add_argument("--port", type=int)
    g.add_argument("--tls", choices=["implicit", "starttls", "none"])
    g.add_argument("--username")
    g.add_argument(
        "--password-ref", help="env:NAME, file:/path or credential:NAME (never the password)"
    )
    g.add_argument("--from-address")
    g.add_argument("--ca-file")
    g.add_argument("--no-verify", action="store_true", help="do not verify the certificate")
    g.add_argument("--allow-plaintext", action="store_true")
    g.add_argument("--allow-tls-port-mismatch", action="store_true")
    sp.add_argument("--pool", help="egress pool to test from (default: the one the relay uses)")
    sp.add_argument("--source", help="one egress source by name")
    sp.add_argument("--all-sources", action="store_true", help="test from every source of the pool")
    sp.add_argument("--mail-from", help="also send MAIL FROM (then RSET)")
    sp.add_argument("--rcpt-to", help="also send RCPT TO (then RSET)")
    sp.add_argument("--send-to", help="send a real test message to this address")
    sp.add_argument("--timeout", type=float, default=15.0, help="seconds per step (default 15)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument(
        "--api",
        action="store_true",
        help="run inside the running relay (its credentials) via the admin API",
    )
    sp.add_argument("--url", help="admin API URL, with --api")
    sp.add_argument("--token-file", help="admin token file, with --api")
    sp.set_defaults(func=cmd_test_upstream)

    sp = sub.add_parser(
        "check-domain", help="SPF, DMARC and DKIM of a sender domain against its route"
    )
    shell.complete_directory(sp.add_argument("-c", "--config", required=True, help="configuration directory"))
    sp.add_argument("domain")
    sp.add_argument("--nameserver", action="append", help="ask this DNS server (repeatable)")
    sp.add_argument(
        "--records",
        help="answer from this JSON file {name: [TXT, ...]} instead of"
        " DNS (check records before publishing them)",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_check_domain)
