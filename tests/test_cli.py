"""The `relay` command as an operator runs it: route explanations and the egress list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SECRET_VARS = (
    "SENDGRID_API_KEY",
    "MAILJET_API_KEY",
    "MAILJET_SECRET_KEY",
    "EUROSTUDY_SMTP_PASSWORD",
    "GLOBEX_RAJ_SMTP_PASSWORD",
    "RELAY_ADMIN_TOKEN",
    "CREDENTIALS_DIRECTORY",
)


def relay(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in SECRET_VARS}
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def route_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = relay("route", "-c", "config", "--json", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


US = ["127.0.0.2", "127.0.0.3"]
EU = ["127.0.0.4"]


@pytest.mark.parametrize(
    ("sender", "org", "upstream", "host_port_tls", "pool", "addresses", "routed_by"),
    [
        (
            "news@acme-surveys.example",
            "acme",
            "sendgrid",
            ("smtp.sendgrid.net", 587, "starttls"),
            "us",
            US,
            "default upstream of organisation acme",
        ),
        (
            "anna@eurostudy.example",
            "eurostudy",
            "mailjet",
            ("in-v3.mailjet.com", 587, "starttls"),
            "eu",
            EU,
            "organisation eurostudy enforces its upstream"
            " (overrides anna@eurostudy.example's personal choice sendgrid)",
        ),
        (
            "jonas@eurostudy.example",
            "eurostudy",
            "mailjet",
            ("in-v3.mailjet.com", 587, "starttls"),
            "eu",
            EU,
            "organisation eurostudy enforces its upstream"
            " (overrides jonas@eurostudy.example's personal choice eurostudy/own-relay)",
        ),
        (
            "surveys@contoso-health.example",
            "contoso",
            "contoso/contoso-smtp",
            ("smtp.contoso-health.example", 465, "implicit"),
            "customer",
            ["127.0.0.5"],
            "default upstream of organisation contoso",
        ),
        (
            "marie@globex.example",
            "globex",
            "mailjet",
            ("in-v3.mailjet.com", 587, "starttls"),
            "eu",
            EU,
            "personal choice of account marie@globex.example",
        ),
        (
            "raj@globex.example",
            "globex",
            "globex/raj-office",
            ("mail.office.globex.example", 587, "starttls"),
            "us",
            US,
            "personal choice of account raj@globex.example",
        ),
        (
            "tom@globex.example",
            "globex",
            "sendgrid",
            ("smtp.sendgrid.net", 587, "starttls"),
            "us",
            US,
            "default upstream of organisation globex",
        ),
        (
            "someone@unknown.example",
            "default",
            "sendgrid",
            ("smtp.sendgrid.net", 587, "starttls"),
            "us",
            US,
            "global default upstream",
        ),
    ],
    ids=["acme", "eurostudy-anna", "eurostudy-jonas", "contoso", "marie", "raj", "tom", "unknown"],
)
def test_route_explains_each_example_organisation(
    sender: str,
    org: str,
    upstream: str,
    host_port_tls: tuple[str, int, str],
    pool: str,
    addresses: list[str],
    routed_by: str,
) -> None:
    d = route_json("--sender", sender)
    assert d["sender"] == sender
    assert d["organisation"]["id"] == org
    assert d["account"] == sender
    assert d["upstream"]["id"] == upstream
    assert (d["upstream"]["host"], d["upstream"]["port"], d["upstream"]["tls"]) == host_port_tls
    assert d["egress_pool"]["name"] == pool
    assert [s["address"] for s in d["egress_pool"]["sources"]] == addresses
    assert d["routed_by"] == routed_by
    assert [lim["scope"] for lim in d["limits"]] == ["client", "organisation", "account", "sender"]
    # The example secrets are unset here: the upstream is reported as waiting for them.
    assert d["upstream"]["unavailable"].startswith("credential unavailable: ")


def test_route_json_has_attribution_limits_and_throttle() -> None:
    acme = route_json("--sender", "news@acme-surveys.example", "--client", "10.1.2.3")
    assert acme["organisation"] == {
        "id": "acme",
        "name": "Acme Surveys Inc.",
        "file": "policies/acme.yaml",
    }
    assert acme["attributed_by"] == "sender domain acme-surveys.example belongs to acme"
    assert acme["limits"] == [
        {"scope": "client", "key": "10.1.2.3", "limit": "unlimited"},
        {"scope": "organisation", "key": "acme", "limit": "/min 600, /day 200000"},
        {"scope": "account", "key": "news@acme-surveys.example", "limit": "unlimited"},
        {"scope": "sender", "key": "news@acme-surveys.example", "limit": "unlimited"},
    ]
    assert acme["upstream"]["throttle"]["max_connections"] == 20
    contoso = route_json("--sender", "x@contoso-health.example")
    assert contoso["upstream"]["from_address"] == "surveys@contoso-health.example"
    assert contoso["upstream"]["throttle"] == {
        "max_connections": 5,
        "min_interval": 1.0,
        "max_messages_per_connection": 50,
        "hourly": 2000,
        "daily": 20000,
    }
    raj = route_json("--sender", "raj@globex.example")
    assert raj["limits"][2] == {
        "scope": "account",
        "key": "raj@globex.example",
        "limit": "/hour 500",
    }


def test_route_with_tag_headers() -> None:
    d = route_json(
        "--sender", "bounce@platform.example", "--org", "globex", "--account", "raj@globex.example"
    )
    assert (d["organisation"]["id"], d["account"], d["upstream"]["id"]) == (
        "globex",
        "raj@globex.example",
        "globex/raj-office",
    )
    assert d["attributed_by"] == "tag header X-Relay-Org"
    null_sender = route_json("--sender", "", "--account", "anna@eurostudy.example")
    assert (null_sender["organisation"]["id"], null_sender["upstream"]["id"]) == (
        "eurostudy",
        "mailjet",
    )
    assert null_sender["attributed_by"] == "tag header X-Relay-Account"


def test_route_with_an_unknown_org_tag_says_so() -> None:
    proc = relay("route", "-c", "config", "--sender", "tom@globex.example", "--org", "initech")
    assert proc.returncode == 0
    assert proc.stderr == (
        "note: organisation 'initech' is not defined; attribution falls through\n"
    )
    assert (
        "attributed by: sender tom@globex.example is a member of globex"
        " (tag X-Relay-Org: 'initech' names no organisation)\n" in proc.stdout
    )


def test_route_text_output() -> None:
    proc = relay("route", "-c", "config", "--sender", "anna@eurostudy.example")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:7] == [
        "sender:        anna@eurostudy.example",
        "organisation:  eurostudy (EuroStudy GmbH)",
        "account:       anna@eurostudy.example",
        "attributed by: sender anna@eurostudy.example is a member of eurostudy",
        "upstream:      mailjet  in-v3.mailjet.com:587 tls=starttls user=env:MAILJET_API_KEY",
        "routed by:     organisation eurostudy enforces its upstream"
        " (overrides anna@eurostudy.example's personal choice sendgrid)",
        "egress pool:   eu  127.0.0.4 (eu-1.relay.example.net)",
    ]
    assert "throttle:      max_connections=10" in lines
    assert (
        "WARNING:       upstream unavailable: credential unavailable:"
        " environment variable MAILJET_API_KEY is not set" in lines
    )
    assert "limit:         organisation eurostudy: unlimited" in lines


def test_route_shows_secret_references_never_values() -> None:
    env = {
        "SENDGRID_API_KEY": "SG.never-print-me",
        "MAILJET_API_KEY": "mj-never-print-me",
        "MAILJET_SECRET_KEY": "mj-secret-never-print-me",
    }
    proc = relay("route", "-c", "config", "--sender", "marie@globex.example", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (
        "upstream:      mailjet  in-v3.mailjet.com:587 tls=starttls"
        " user=env:MAILJET_API_KEY password=env:MAILJET_SECRET_KEY\n" in proc.stdout
    )
    d = route_json("--sender", "news@acme-surveys.example", env=env)
    assert (d["upstream"]["username"], d["upstream"]["password"]) == (
        "apikey",
        "env:SENDGRID_API_KEY",
    )
    assert d["upstream"]["unavailable"] is None
    for value in env.values():
        assert value not in proc.stdout + proc.stderr + json.dumps(d)


def test_route_on_an_invalid_config_fails_with_the_errors() -> None:
    case = REPO / "tests" / "bad_configs" / "undefined_upstream_org"
    proc = relay("route", "-c", ".", "--sender", "x@acme.example", cwd=case)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (case / "expected.txt").read_text()


# -- egress-ips ----------------------------------------------------------------------------


def test_egress_ips_text() -> None:
    proc = relay("egress-ips", "-c", "config")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "127.0.0.2\tus-1.relay.example.net\tus\n"
        "127.0.0.3\tus-2.relay.example.net\tus\n"
        "127.0.0.4\teu-1.relay.example.net\teu\n"
        "127.0.0.5\tcust-1.relay.example.net\tcustomer\n"
    )
    us = relay("egress-ips", "-c", "config", "--pool", "us", "--format", "text")
    assert (
        us.stdout
        == "127.0.0.2\tus-1.relay.example.net\tus\n127.0.0.3\tus-2.relay.example.net\tus\n"
    )


def test_egress_ips_json() -> None:
    proc = relay("egress-ips", "-c", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["addresses"] == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
    assert list(d["pools"]) == ["us", "eu", "customer"]
    assert d["pools"]["customer"] == [
        {"name": "cust-1", "address": "127.0.0.5", "ehlo": "cust-1.relay.example.net"}
    ]
    eu = json.loads(relay("egress-ips", "-c", "config", "--format", "json", "--pool", "eu").stdout)
    assert eu == {
        "addresses": ["127.0.0.4"],
        "pools": {
            "eu": [{"name": "eu-1", "address": "127.0.0.4", "ehlo": "eu-1.relay.example.net"}]
        },
    }


def test_egress_ips_spf() -> None:
    proc = relay("egress-ips", "-c", "config", "--format", "spf")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ip4:127.0.0.2 ip4:127.0.0.3 ip4:127.0.0.4 ip4:127.0.0.5\n"
    customer = relay("egress-ips", "-c", "config", "--format", "spf", "--pool", "customer")
    assert customer.stdout == "ip4:127.0.0.5\n"


def test_egress_ips_lists_a_shared_source_once_and_ipv6_as_ip6(tmp_path: Path) -> None:
    (tmp_path / "relay.yaml").write_text(
        "egress_sources:\n"
        "  v4: {address: 127.0.0.2, ehlo: v4.relay.example.net}\n"
        "  v6: {address: '::1', ehlo: v6.relay.example.net}\n"
        "egress_pools:\n"
        "  default: [v4, v6]\n"
        "  small: [v4]\n"
    )
    spf = relay("egress-ips", "-c", str(tmp_path), "--format", "spf")
    assert spf.returncode == 0, spf.stderr
    assert spf.stdout == "ip4:127.0.0.2 ip6:::1\n"
    text = relay("egress-ips", "-c", str(tmp_path))
    assert (
        text.stdout
        == "127.0.0.2\tv4.relay.example.net\tdefault,small\n::1\tv6.relay.example.net\tdefault\n"
    )


def test_egress_ips_unknown_pool_fails() -> None:
    proc = relay("egress-ips", "-c", "config", "--pool", "asia")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "unknown pool 'asia' (pools: us, eu, customer)\n"


# -- hash-password -------------------------------------------------------------------------


def test_hash_password_reads_stdin_and_prints_a_verifiable_hash() -> None:
    from relay.smtp.users import verify_password

    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "hash-password"],
        input="c0rrect horse\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    [encoded] = proc.stdout.splitlines()
    assert encoded.startswith("scrypt$")
    assert "c0rrect horse" not in proc.stdout + proc.stderr
    assert verify_password("c0rrect horse", encoded)
    assert not verify_password("c0rrect horse ", encoded)
    empty = subprocess.run(
        [sys.executable, "-m", "relay.cli", "hash-password"],
        input="\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (empty.returncode, empty.stdout, empty.stderr) == (1, "", "empty password\n")
