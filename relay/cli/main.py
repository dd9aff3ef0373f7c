"""The `relay` command: its parser, and the commands that need only the configuration (serve,
check, route, egress-ips, hash-password). The operator tools live beside it: queue.py
(queue, reload) and diagnose.py (test-upstream, check-domain)."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import signal
import sys
from collections.abc import Sequence

from relay.cli import diagnose, notify, queue, shell, top, verify
from relay.cli.common import load_or_report
from relay.config import ConfigErrors
from relay.config.model import Config
from relay.limits import limits_dir
from relay.limits.usage import as_text as usage_text
from relay.limits.usage import current_use
from relay.ops.explain import as_text, explain
from relay.policy import applicable_limits, attribute, route
from relay.policy.egress import render
from relay.runtime.serve import serve
from relay.runtime.slot import WorkerSlot
from relay.runtime.startup import load_checked
from relay.smtp.users import hash_password
from relay.spool.verification import VerificationStore


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config, _users = load_checked(args.config)  # the files it names, the users file
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return 1
    for w in config.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.strict and config.warnings:
        return 1
    print(
        f"{config.file}: OK ({len(config.orgs)} organisations, {len(config.upstreams)} upstreams,"
        f" {len(config.sources)} egress sources)"
    )
    return 0


def cmd_route(args: argparse.Namespace) -> int:

    config = load_or_report(args.config)
    if config is None:
        return 1
    if args.org and args.org not in config.orgs:
        print(
            f"note: organisation '{args.org}' is not defined; attribution falls through",
            file=sys.stderr,
        )
    verified = VerificationStore(config.spool_path / "upstreams").verified_ids(config)
    d = explain(config, args.sender, org=args.org, account=args.account, client=args.client,
                verified=verified)
    d["current_use"] = _current_use(config, args)
    text = "\n".join([as_text(d), *usage_text(d["current_use"])])
    print(json.dumps(d, indent=2) if args.json else text)
    return 0


def _current_use(config: Config, args: argparse.Namespace) -> dict[str, object]:
    """Live counters of the limits that apply (readable with the Redis backend only)."""

    att = attribute(config, args.sender, tag_org=args.org, tag_account=args.account)
    limits = applicable_limits(config, att, args.sender, args.client)
    upstream = route(config, att).upstream
    return asyncio.run(current_use(config.relay.limits, limits, upstream, limits_dir(config)))


def cmd_egress_ips(args: argparse.Namespace) -> int:
    config = load_or_report(args.config)
    if config is None:
        return 1
    if args.pool and args.pool not in config.pools:
        print(f"unknown pool '{args.pool}' (pools: {', '.join(config.pools)})", file=sys.stderr)
        return 1
    print(render(config, args.pool, args.format))
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    pw = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else getpass.getpass()
    if not pw:
        print("empty password", file=sys.stderr)
        return 1
    print(hash_password(pw))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    slot = None
    if args.worker:  # started by a supervisor (workers > 1), never by hand
        slot = WorkerSlot.parse(args.worker, args.listen_fds, args.ready_fd, args.admin_socket)
        slot.bind_to_parent()
        # A reload forwarded while this worker still starts: it reads the newest files anyway.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return serve(args.config, slot)


def cmd_completion(args: argparse.Namespace) -> int:
    print(shell.completion_script(build_parser(), args.shell), end="")
    return 0


def cmd_manpage(args: argparse.Namespace) -> int:
    print(shell.manpage(build_parser()), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relay", description="egress-relay: policy-routed SMTP relay")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser, required: bool = True) -> None:
        shell.complete_directory(sp.add_argument(
            "-c",
            "--config",
            required=required,
            default=None,
            help="configuration directory (holding relay.yaml) or file",
        ))

    sp = sub.add_parser("serve", help="run the relay")
    with_config(sp, required=False)
    # Set by the supervisor for its worker processes (relay/runtime/supervisor.py); hidden.
    sp.add_argument("--worker", help=argparse.SUPPRESS)
    sp.add_argument("--listen-fds", help=argparse.SUPPRESS)
    sp.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    sp.add_argument("--admin-socket", help=argparse.SUPPRESS)
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("check", help="validate the configuration and policies; binds nothing")
    with_config(sp)
    sp.add_argument(
        "--strict", action="store_true", help="warnings (e.g. missing secrets) fail too"
    )
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser(
        "route", help="explain attribution, routing, egress and limits for a sender"
    )
    with_config(sp)
    sp.add_argument("--sender", required=True, help="envelope sender address ('' for <>)")
    sp.add_argument("--org", help="as if tagged with the organisation header")
    sp.add_argument("--account", help="as if tagged with the account header")
    sp.add_argument("--client", default="127.0.0.1", help="client address or user")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_route)

    sp = sub.add_parser("egress-ips", help="print the egress addresses customers allowlist")
    with_config(sp)
    sp.add_argument("--pool")
    sp.add_argument("--format", choices=["text", "json", "spf"], default="text")
    sp.set_defaults(func=cmd_egress_ips)

    sp = sub.add_parser("hash-password", help="read a password on stdin, print its users-file hash")
    sp.set_defaults(func=cmd_hash_password)

    queue.add_subcommands(sub)  # queue, reload
    diagnose.add_subcommands(sub)  # test-upstream, check-domain
    top.add_subcommands(sub)
    notify.add_subcommands(sub)  # events, trace, suppression
    verify.add_subcommands(sub)  # verify-upstream

    sp = sub.add_parser("completion", help="print a shell completion script (bash or zsh)")
    sp.add_argument("shell", choices=shell.SHELLS)
    sp.set_defaults(func=cmd_completion)
    sp = sub.add_parser("manpage", help="print relay(1), the manual page, in roff")
    sp.set_defaults(func=cmd_manpage)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
