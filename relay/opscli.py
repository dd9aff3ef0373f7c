"""Operator subcommands of `relay`: queue, reload, test-upstream, check-domain.

`queue` and `reload` act on the *running* relay (one process owns the spool), through its
admin API: the URL comes from the config's `admin:` section, the token from `--token-file`,
else $RELAY_ADMIN_TOKEN, else the config's own `admin.token` reference. `test-upstream`
runs the probe in this process from the relay's egress sources (or, with `--api`, inside the
running relay, with its credentials); `check-domain` reads DNS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from relay.config import ConfigErrors, load_config
from relay.config.model import Config
from relay.config.secrets import SecretUnavailable, resolve_secret

TOKEN_ENV = "RELAY_ADMIN_TOKEN"


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return None


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


# -- the admin API client -------------------------------------------------------------------


class AdminError(Exception):
    """The API could not be reached, or refused us; the message is for the operator."""


class AdminClient:
    def __init__(self, url: str, token: str | None, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        config = _load(args.config) if args.config else None
        if args.config and config is None:
            raise AdminError("the configuration does not load (errors above)")
        url = args.url
        if url is None:
            if config is None:
                raise AdminError("give -c CONFIG or --url")
            a = config.relay.admin
            if not a.enabled:
                raise AdminError("the admin API is disabled (admin.enabled: false)")
            host = f"[{a.address}]" if ":" in a.address else a.address
            url = f"http://{host}:{a.port}"
        return cls(url, _token(args, config))

    def call(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> tuple[int, Any]:
        q = {k: v for k, v in (query or {}).items() if v is not None}
        full = self.url + path + ("?" + urllib.parse.urlencode(q) if q else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(full, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, _decode(resp.read(), resp.headers.get_content_type())
        except urllib.error.HTTPError as exc:
            payload = _decode(exc.read(), exc.headers.get_content_type())
            if exc.code in (401, 403):
                msg = payload.get("error") if isinstance(payload, dict) else payload
                raise AdminError(f"{exc.code}: {msg}") from None
            return exc.code, payload
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AdminError(
                f"cannot reach the relay's admin API at {self.url}: {reason}"
                " (is `relay serve` running?)"
            ) from None


def _decode(raw: bytes, ctype: str) -> Any:
    text = raw.decode("utf-8", "replace")
    if ctype == "application/json":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _token(args: argparse.Namespace, config: Config | None) -> str | None:
    if args.token_file:
        try:
            return Path(args.token_file).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise AdminError(f"cannot read {args.token_file}: {exc.strerror}") from None
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    ref = config.relay.admin.token if config else None
    if not ref:
        return None
    try:
        return resolve_secret(ref, base_dir=config.base_dir).reveal() if config else None
    except SecretUnavailable as exc:
        raise AdminError(
            f"admin token {ref}: {exc}. Give --token-file (e.g. the file systemd's"
            f" LoadCredential= reads) or set {TOKEN_ENV}"
        ) from None


def _add_api_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-c", "--config", help="configuration directory (for the admin URL and token)")
    sp.add_argument("--url", help="admin API URL (default: from the config's admin: section)")
    sp.add_argument("--token-file", help=f"file holding the admin token (else ${TOKEN_ENV})")


# -- relay queue ----------------------------------------------------------------------------


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


def _print_list(messages: list[dict[str, Any]]) -> None:
    if not messages:
        print("no messages match")
        return
    print(f"{'queue id':<22} {'age':>6} {'org':<14} {'upstream':<20} {'rcpts':>5}  last reply")
    for m in messages:
        held = " HELD" if m["held"] else ""
        reply = (m.get("last_reply") or "")[:60]
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
        config = _load(args.config)
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
    from relay.supervisor import running_supervisor

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


# -- relay test-upstream --------------------------------------------------------------------


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
    from relay.delivery import DnsResolver
    from relay.probe import TargetError, adhoc_upstream, configured_upstream, probe, sources_for

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
    config = _load(args.config)
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
    return 0 if all(r.ok for r in reports) else 1


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
        from relay.probe import ProbeReport, Step

        texts = []
        for r in data["reports"]:
            rep = ProbeReport(**{k: v for k, v in r.items() if k not in ("steps", "ok")})
            rep.steps = [Step(**s) for s in r["steps"]]
            texts.append(rep.as_text())
        print("\n\n".join(texts))
    return 0 if data["ok"] else 1


# -- relay check-domain ---------------------------------------------------------------------


def cmd_check_domain(args: argparse.Namespace) -> int:
    from relay.domaincheck import DnsTxtResolver, StaticTxtResolver, TxtResolver, check_domain

    config = _load(args.config)
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


# -- argument parsing -----------------------------------------------------------------------


def add_subcommands(sub: Any) -> None:
    sp = sub.add_parser("queue", help="the running relay's queue: summary, list, show and actions")
    _add_api_args(sp)
    sp.add_argument("--json", action="store_true")
    qsub = sp.add_subparsers(dest="action")
    qsub.add_parser("summary", help="counts by upstream and organisation (default)")
    for name, text in (
        ("list", "queued messages, oldest first"),
        ("show", "one message: recipients, state, headers"),
        ("retry", "attempt delivery now"),
        ("hold", "no delivery until released"),
        ("release", "undo hold"),
        ("delete", "remove without a DSN"),
        ("bounce", "return to the sender with a DSN"),
    ):
        qp = qsub.add_parser(name, help=text)
        if name == "show":
            qp.add_argument("ids", nargs=1, metavar="QUEUE_ID")
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
    _add_api_args(sp)
    sp.set_defaults(func=cmd_reload)

    sp = sub.add_parser(
        "test-upstream",
        help="connect, TLS, AUTH (and optionally MAIL/RCPT or a test message)"
        " from the relay's egress source, step by step",
    )
    sp.add_argument("name", nargs="?", help="a configured upstream id (org-own ones: org/name)")
    sp.add_argument("-c", "--config", help="configuration directory")
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
    sp.add_argument("-c", "--config", required=True, help="configuration directory")
    sp.add_argument("domain")
    sp.add_argument("--nameserver", action="append", help="ask this DNS server (repeatable)")
    sp.add_argument(
        "--records",
        help="answer from this JSON file {name: [TXT, ...]} instead of"
        " DNS (check records before publishing them)",
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_check_domain)
