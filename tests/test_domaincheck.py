"""relay check-domain: SPF / DMARC / DKIM against fixed DNS answers (a static resolver: the
one place where DNS is faked), for correct, missing and wrong records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import load_config
from relay.config.model import Config
from relay.ops.domaincheck import (
    MISSING,
    OK,
    WRONG,
    LookupFailed,
    StaticTxtResolver,
    check_domain,
)
from tests.relayproc import RelayConfig

DMARC = "v=DMARC1; p=quarantine; rua=mailto:d@acme.test"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = RelayConfig(
        tmp_path / "relay",
        upstreams={"sendgrid": {"password": "env:NOPE_SG", "pool": "default"},
                   "mailjet": {"username": "env:NOPE_MJ", "password": "env:NOPE_MJ2", "pool": "b"}},
        egress_sources={"a": {"address": "127.0.0.2", "ehlo": "a.relay.test"},
                        "b": {"address": "127.0.0.3", "ehlo": "b.relay.test"},
                        "c": {"address": "127.0.0.4", "ehlo": "c.relay.test"},
                        "d": {"address": "::1", "ehlo": "d.relay.test"}},
        egress_pools={"default": ["a"], "b": ["b"], "customer": ["c", "d"]},
        orgs=[
            {"org": "acme", "domains": ["acme.test"], "upstream": "sendgrid"},
            {"org": "globex", "domains": ["globex.test"], "upstream": "sendgrid",
             "members": {"marie@globex.test": {"upstream": "mailjet"}}},
            {"org": "contoso", "domains": ["contoso.test"], "upstream": "own", "pool": "customer",
             "dkim_selectors": ["sel2024"],
             "upstreams": {"own": {"host": "mx.contoso.test", "port": 465, "tls": "implicit",
                                   "username": "u", "password": "env:NOPE_C"}}},
        ],
    ).write()
    return load_config(cfg, environ={})


def by_check(report: object) -> dict[str, object]:
    return {f.check: f for f in report.findings}  # type: ignore[attr-defined]


async def test_correct_records(config: Config) -> None:
    dns = StaticTxtResolver({
        # SendGrid authorised through a nested include, as many domains do.
        "acme.test": ["google-site-verification=x", "v=spf1 include:_spf.acme.test -all"],
        "_spf.acme.test": ["v=spf1 ip4:192.0.2.0/24 include:sendgrid.net ~all"],
        "sendgrid.net": ["v=spf1 ip4:167.89.0.0/17 ~all"],
        "_dmarc.acme.test": [DMARC],
        "s1._domainkey.acme.test": ["k=rsa; t=s; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQ"],
        "s2._domainkey.acme.test": ["k=rsa; t=s; p=MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgR"],
    })
    report = await check_domain(config, "ACME.test.", dns)
    assert report.org == "acme"
    assert report.ok, report.as_text()
    assert [f.check for f in report.findings] == ["SPF", "DMARC", "DKIM s1", "DKIM s2"]
    assert "include:sendgrid.net" in report.findings[0].detail
    assert report.as_text().splitlines()[-1] == "result: everything is in place"


async def test_missing_records_print_what_to_publish(config: Config) -> None:
    report = await check_domain(config, "acme.test", StaticTxtResolver({}))
    f = by_check(report)
    assert not report.ok
    assert (f["SPF"].status, f["SPF"].publish) == (  # type: ignore[attr-defined]
        MISSING, ['acme.test. IN TXT "v=spf1 include:sendgrid.net ~all"'])
    assert f["DMARC"].status == MISSING  # type: ignore[attr-defined]
    assert f["DMARC"].publish == [  # type: ignore[attr-defined]
        '_dmarc.acme.test. IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@acme.test"']
    assert f["DKIM s1"].status == MISSING  # type: ignore[attr-defined]
    assert f["DKIM s1"].publish[0].startswith("s1._domainkey.acme.test. IN CNAME s1.domainkey.")  # type: ignore[attr-defined]
    text = report.as_text()
    assert 'publish: acme.test. IN TXT "v=spf1 include:sendgrid.net ~all"' in text


async def test_wrong_spf_gets_the_corrected_record(config: Config) -> None:
    dns = StaticTxtResolver({
        "acme.test": ["v=spf1 include:_spf.google.com ~all"],
        "_spf.google.com": ["v=spf1 ip4:172.217.0.0/19 ~all"],
        "_dmarc.acme.test": [DMARC],
    })
    report = await check_domain(config, "acme.test", dns)
    spf = report.findings[0]
    assert spf.status == WRONG
    assert spf.detail == "does not authorise include:sendgrid.net"
    assert spf.found == ["v=spf1 include:_spf.google.com ~all"]
    assert spf.publish == ['acme.test. IN TXT "v=spf1 include:_spf.google.com include:sendgrid.net ~all"']
    assert report.findings[1].status == OK


async def test_member_choices_need_both_providers(config: Config) -> None:
    # A subdomain: owned through its parent; the parent's DMARC record applies to it.
    dns = StaticTxtResolver({"news.globex.test": ["v=spf1 include:sendgrid.net -all"],
                             "sendgrid.net": ["v=spf1 ~all"],
                             "_dmarc.globex.test": ["v=DMARC1; p=reject"]})
    report = await check_domain(config, "news.globex.test", dns)
    assert report.org == "globex"
    f = by_check(report)
    assert f["SPF"].publish == ['news.globex.test. IN TXT "v=spf1 include:sendgrid.net include:spf.mailjet.com -all"']  # type: ignore[attr-defined]
    assert f["DMARC"].status == OK and "inherited from _dmarc.globex.test" in f["DMARC"].detail  # type: ignore[attr-defined]
    assert set(f) == {"SPF", "DMARC", "DKIM s1", "DKIM s2", "DKIM mailjet"}


async def test_customer_server_needs_the_egress_addresses(config: Config) -> None:
    dns = StaticTxtResolver({
        "contoso.test": ["v=spf1 ip4:127.0.0.0/29 mx -all"],
        "_dmarc.contoso.test": ["v=DMARC1; p=none"],
        "sel2024._domainkey.contoso.test": ["v=DKIM1; k=rsa; p="],
    })
    report = await check_domain(config, "contoso.test", dns)
    f = by_check(report)
    spf = f["SPF"]
    assert spf.status == WRONG  # type: ignore[attr-defined]
    assert spf.detail.startswith("does not authorise ip6:::1")  # type: ignore[attr-defined]
    assert spf.publish == ['contoso.test. IN TXT "v=spf1 ip4:127.0.0.0/29 mx ip6:::1 -all"']  # type: ignore[attr-defined]
    assert f["DKIM sel2024"].status == WRONG  # type: ignore[attr-defined]  (revoked key)
    assert "monitoring only" in f["DMARC"].detail  # type: ignore[attr-defined]


async def test_two_spf_records_and_dns_failure(config: Config) -> None:
    dns = StaticTxtResolver({"acme.test": ["v=spf1 include:sendgrid.net ~all", "v=spf1 -all"],
                             "_dmarc.acme.test": LookupFailed("SERVFAIL")})
    report = await check_domain(config, "acme.test", dns)
    f = by_check(report)
    assert f["SPF"].status == WRONG and "2 SPF records" in f["SPF"].detail  # type: ignore[attr-defined]
    assert f["DMARC"].status == "ERROR"  # type: ignore[attr-defined]


async def test_too_many_lookups(config: Config) -> None:
    chain = {f"l{i}.test": [f"v=spf1 include:l{i + 1}.test ~all"] for i in range(12)}
    dns = StaticTxtResolver({"acme.test": ["v=spf1 include:sendgrid.net include:l0.test ~all"],
                             "sendgrid.net": ["v=spf1 ~all"], **chain})
    report = await check_domain(config, "acme.test", dns)
    assert report.findings[0].status == WRONG
    assert "more than 10 DNS lookups" in report.findings[0].detail


def test_cli_exit_codes_and_json(config: Config, tmp_path: Path) -> None:
    """The CLI runs end to end (argument parsing, exit code, JSON) with --records, a fixed-answer
    file (DNS itself is the one boundary faked here)."""
    records = tmp_path / "records.json"
    records.write_text(json.dumps({"acme.test": ["v=spf1 include:sendgrid.net ~all"],
                                   "sendgrid.net": ["v=spf1 ~all"],
                                   "_dmarc.acme.test": [DMARC],
                                   "s1._domainkey.acme.test": ["p=abc"],
                                   "s2._domainkey.acme.test": ["p=abd"]}))
    cfg_dir = str(Path(config.file).parent)
    run = [sys.executable, "-m", "relay.cli", "check-domain", "-c", cfg_dir, "--records", str(records)]
    ok = subprocess.run([*run, "acme.test"], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin"})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SPF          OK" in ok.stdout
    bad = subprocess.run([*run, "--json", "globex.test"], capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin"})
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["org"] == "globex" and doc["ok"] is False
    assert doc["findings"][0]["status"] == "MISSING"
