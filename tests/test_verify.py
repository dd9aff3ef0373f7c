"""The verified switch-over: a `verify: true` upstream carries no mail until a one-time code
sent through it is confirmed; meanwhile the organisation's mail goes where it went before."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config import load_config
from relay.policy import Attribution, route
from relay.spool.verification import VerificationStore
from tests.adminapi import ENV, TOKEN, admin_url, http, relay_with_admin
from tests.certs import CertAuthority
from tests.idp import IdentityProvider
from tests.relayproc import RelayProcess, plain_upstream, send
from tests.sinks import ThreadedSink

MAILBOX = "surveys@contoso.test"
SECRET = "entra-client-secret-value-9"
CODE = re.compile(r"code: ([A-Z2-9]{4}-[A-Z2-9]{4})")


@pytest.fixture
def idp(ca: CertAuthority) -> Iterator[IdentityProvider]:
    with IdentityProvider(ca) as server:
        server.add_app("client-1", secret=SECRET, mailboxes={MAILBOX})
        yield server


def org(old_port: int, new_port: int, idp: IdentityProvider, ca: CertAuthority,
        **new: Any) -> dict[str, Any]:
    m365 = {
        "provider": "microsoft365", "host": "mx.test", "port": new_port, "tls": "none",
        "allow_plaintext": True, "auth": "xoauth2", "username": MAILBOX,
        "oauth": {"tenant": "tenant-1", "client_id": "client-1",
                  "client_secret": "env:ENTRA_SECRET", "token_endpoint": idp.endpoint("tenant-1"),
                  "ca_file": ca.ca_file},
        "throttle": {"quotas": [], "daily": None},
        "verify": True, "previous": "smtp", **new,
    }
    return {"org": "contoso", "domains": ["contoso.test"], "upstream": "m365",
            "upstreams": {"smtp": plain_upstream(old_port), "m365": m365}}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **ENV})


def test_routing_skips_an_unverified_upstream_for_its_previous_then_the_default(
    tmp_path: Path, ca: CertAuthority
) -> None:
    doc = {"upstreams": {"fallback": plain_upstream(2)}, "default_upstream": "fallback",
           "spool": {"path": "spool"}}
    (tmp_path / "policies").mkdir()
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(doc))
    o = {"org": "contoso", "domains": ["contoso.test"], "upstream": "new",
         "upstreams": {"old": plain_upstream(3), "new": plain_upstream(4, verify=True,
                                                                     previous="old"),
                       "lone": plain_upstream(5, verify=True)},
         "members": {"anna@contoso.test": {"upstream": "lone"}}}
    (tmp_path / "policies" / "contoso.yaml").write_text(yaml.safe_dump(o))
    config = load_config(str(tmp_path))
    r = route(config, Attribution("contoso", "x@contoso.test", "t"))
    assert r.upstream.id == "contoso/old" and "contoso/new not verified yet" in r.rule
    r = route(config, Attribution("contoso", "x@contoso.test", "t"), {"contoso/new"})
    assert r.upstream.id == "contoso/new"
    # a member's unverified choice falls back to the organisation's own (verified) upstream
    r = route(config, Attribution("contoso", "anna@contoso.test", "t"), {"contoso/new"})
    assert r.upstream.id == "contoso/new" and "contoso/lone not verified yet" in r.rule
    r = route(config, Attribution("contoso", "anna@contoso.test", "t"))
    assert r.upstream.id == "contoso/old"
    # the store: nothing verified, and a wrong code never verifies
    store = VerificationStore(tmp_path / "spool" / "upstreams")
    assert store.verified_ids(config) == frozenset()
    new = config.upstreams["contoso/new"]
    code = store.begin(new, "it@contoso.test")
    assert not store.confirm(new, "AAAA-AAAA").ok
    assert store.confirm(new, code.lower()).ok  # typed in lower case: still the code
    assert VerificationStore(tmp_path / "spool" / "upstreams").verified_ids(config) == {"contoso/new"}
    assert code not in (tmp_path / "spool" / "upstreams" / "verification.json").read_text()
    # the default cannot wait for verification itself
    doc["upstreams"]["fallback"]["verify"] = True
    (tmp_path / "relay.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(Exception, match="default_upstream 'fallback' has verify: true"):
        load_config(str(tmp_path))


def test_switch_over_with_a_code_read_from_the_received_message(
    tmp_path: Path, idp: IdentityProvider, ca: CertAuthority
) -> None:
    def check(user: str, token: str) -> str | None:
        return None if idp.valid(token, user) else "535 5.7.3 Authentication unsuccessful"

    with ThreadedSink() as old, ThreadedSink(oauth=check, auth_require_tls=False) as new:
        conf = relay_with_admin(tmp_path / "relay", orgs=[org(old.port, new.port, idp, ca)])
        cfg = conf.write()
        env = {**ENV, "ENTRA_SECRET": SECRET}
        os.environ["ENTRA_SECRET"] = SECRET  # for the CLI subprocesses too
        try:
            with RelayProcess(cfg, env=env) as relay:
                url = admin_url(relay)
                send(relay.port, "app@contoso.test", ["r1@example.test"])
                old.wait_for(1)
                routed = cli("route", "-c", str(cfg), "--sender", "app@contoso.test")
                assert "upstream:      contoso/smtp" in routed.stdout, routed.stdout
                assert "contoso/m365 not verified yet" in routed.stdout
                # before the tenant's admin consented: not sent, the IdP's own words
                idp.apps["client-1"].consented = False
                failed = cli("verify-upstream", "contoso/m365", "-c", str(cfg), "--url", url,
                             "--send-to", "it@contoso.test")
                assert failed.returncode == 1 and "AADSTS65001" in failed.stdout
                assert "not sent" in failed.stdout and not new.messages
                idp.apps["client-1"].consented = True
                # send the code through the new upstream, as `relay verify-upstream` does
                out = cli("verify-upstream", "contoso/m365", "-c", str(cfg), "--url", url,
                          "--send-to", "it@contoso.test")
                assert out.returncode == 0, out.stdout + out.stderr
                assert "AUTH XOAUTH2" in out.stdout and "token" in out.stdout
                new.wait_for(1)
                [msg] = new.messages
                assert msg.rcpt_tos == ["it@contoso.test"] and msg.peer_ip == "127.0.0.2"
                code = CODE.search(msg.data.decode()).group(1)  # type: ignore[union-attr]
                assert code not in relay.output()
                wrong = cli("verify-upstream", "contoso/m365", "-c", str(cfg), "--url", url,
                            "--confirm", "ZZZZ-ZZZZ")
                assert wrong.returncode == 1 and "wrong code" in wrong.stdout
                send(relay.port, "app@contoso.test", ["r2@example.test"])
                old.wait_for(2)  # still the old way until confirmed
                ok = cli("verify-upstream", "contoso/m365", "-c", str(cfg), "--url", url,
                         "--confirm", code)
                assert ok.returncode == 0 and "is verified" in ok.stdout, ok.stdout + ok.stderr
                send(relay.port, "app@contoso.test", ["r3@example.test"])
                new.wait_for(2)
                assert new.messages[1].rcpt_tos == ["r3@example.test"]
                assert new.messages[1].auth_identity == MAILBOX
            with RelayProcess(cfg, env=env) as relay:  # survives a restart
                send(relay.port, "app@contoso.test", ["r4@example.test"])
                new.wait_for(3)
                # changing the user makes it unverified again (at the reload)
                conf.orgs = [org(old.port, new.port, idp, ca, username="other@contoso.test")]
                conf.write()
                status, body, _ = http("POST", admin_url(relay) + "/reload", token=TOKEN)
                assert status == 200, body
                status, body, _ = http("GET", admin_url(relay) + "/upstreams")
                v = body["upstreams"]["contoso/m365"]["verification"]
                assert v["verified"] is False and v["changed_since_verified"] is True
                send(relay.port, "app@contoso.test", ["r5@example.test"])
                old.wait_for(3)
                assert old.messages[2].rcpt_tos == ["r5@example.test"]
        finally:
            os.environ.pop("ENTRA_SECRET", None)
    assert len(new.messages) == 3 and len(old.messages) == 3
