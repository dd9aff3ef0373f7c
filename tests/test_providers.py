"""Provider profiles in the configuration, the reply classifiers, and test connection's token
step (real HTTPS identity provider, real STARTTLS sink)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import ConfigErrors, load_config
from relay.core.model import (
    EgressSource,
    Flow,
    IdentityProvider,
    OAuthSettings,
    Reply,
    Secret,
    TlsMode,
    Upstream,
    UpstreamPause,
)
from relay.delivery import DnsResolver
from relay.delivery.outcome import parse_reply
from relay.delivery.providers import KINDS, classify
from relay.ops.probe import probe
from relay.scheduler.health import UpstreamHealth
from tests.certs import CertAuthority
from tests.conftest import MakeSink
from tests.idp import IdentityProvider as Idp

SOURCE = EgressSource("a", "127.0.0.2", "a.relay.test")
RESOLVER = DnsResolver({"mx.test": ["127.0.0.1"]})
MAILBOX = "surveys@contoso.test"
SECRET = "entra-secret-value-5678"


def write(tmp: Path, upstream: dict[str, Any]) -> Path:
    (tmp / "policies").mkdir(exist_ok=True)
    (tmp / "relay.yaml").write_text(yaml.safe_dump({"spool": {"path": "spool"}}))
    (tmp / "policies" / "contoso.yaml").write_text(yaml.safe_dump(
        {"org": "contoso", "upstream": "m365", "upstreams": {"m365": upstream}}))
    return tmp


def errors(tmp: Path, upstream: dict[str, Any]) -> str:
    with pytest.raises(ConfigErrors) as info:
        load_config(str(write(tmp, upstream)))
    return str(info.value)


OAUTH = {"tenant": "t1", "client_id": "c1", "client_secret": "env:ENTRA"}


def test_a_profile_fills_host_port_tls_and_throttles_all_overridable(tmp_path: Path) -> None:
    config = load_config(str(write(tmp_path, {"provider": "microsoft365", "auth": "xoauth2",
                                              "username": MAILBOX, "oauth": OAUTH})),
                         environ={"ENTRA": SECRET})
    u = config.upstreams["contoso/m365"]
    assert (u.host, u.port, u.tls) == ("smtp.office365.com", 587, TlsMode.STARTTLS)
    assert (u.throttle.max_connections, u.throttle.quotas, u.throttle.daily) == (3, ((30, 60),), 10_000)
    assert u.oauth is not None and u.oauth.token_endpoint == (
        "https://login.microsoftonline.com/t1/oauth2/v2.0/token")
    assert u.oauth.scope == "https://outlook.office365.com/.default"
    assert u.oauth.flow is Flow.CLIENT_CREDENTIALS and u.unavailable is None
    config = load_config(str(write(tmp_path, {"provider": "gmail", "port": 465, "tls": "implicit",
                                              "username": "a@gmail.test",
                                              "password": "env:APP_PW",
                                              "throttle": {"daily": 100}})),
                         environ={"APP_PW": "abcd efgh"})
    u = config.upstreams["contoso/m365"]
    assert (u.host, u.port, u.tls, u.throttle.daily, u.auth) == (
        "smtp.gmail.com", 465, TlsMode.IMPLICIT, 100, "password")
    # a missing client secret marks only this upstream unavailable: its mail waits
    config = load_config(str(write(tmp_path, {"provider": "microsoft365", "auth": "xoauth2",
                                              "username": MAILBOX, "oauth": OAUTH})), environ={})
    assert "ENTRA is not set" in (config.upstreams["contoso/m365"].unavailable or "")


@pytest.mark.parametrize(("upstream", "message"), [
    ({"provider": "microsoft365", "auth": "xoauth2", "username": MAILBOX,
      "oauth": {**OAUTH, "client_secret": "the-secret-itself"}}, "literal secrets are not allowed"),
    ({"provider": "microsoft365", "auth": "xoauth2", "username": MAILBOX,
      "oauth": {"tenant": "t1", "client_secret": "env:X"}}, "needs client_id"),
    ({"provider": "microsoft365", "auth": "xoauth2", "oauth": OAUTH}, "needs username"),
    ({"provider": "microsoft365", "auth": "xoauth2", "username": MAILBOX}, "needs an oauth: block"),
    ({"provider": "microsoft365", "auth": "xoauth2", "username": MAILBOX, "password": "env:P",
      "oauth": OAUTH}, "not a password"),
    ({"provider": "google-workspace", "auth": "xoauth2", "username": MAILBOX,
      "oauth": {"client_id": "c", "client_secret": "env:X"}}, "service_account_key"),
    ({"host": "mx.test", "port": 587, "tls": "starttls", "auth": "xoauth2", "username": MAILBOX,
      "oauth": OAUTH}, "idp: microsoft or google"),
    ({"provider": "office365"}, "provider"),
    ({"provider": "microsoft365", "verify": True, "previous": "nowhere", "username": MAILBOX,
      "password": "env:P"}, "previous upstream 'nowhere' is not defined"),
])
def test_bad_oauth_settings_are_reported_at_their_line(
    tmp_path: Path, upstream: dict[str, Any], message: str
) -> None:
    text = errors(tmp_path, upstream)
    assert message in text and "contoso.yaml:" in text
    assert "the-secret-itself" not in text


M365 = Upstream("c/m", "smtp.office365.com", 587, TlsMode.STARTTLS, "p", username=MAILBOX,
                password=Secret("pw-123456", "credential:contoso"), provider="microsoft365")
OAUTH_M365 = Upstream("c/o", "smtp.office365.com", 587, TlsMode.STARTTLS, "p", username=MAILBOX,
                      auth="xoauth2", provider="microsoft365",
                      oauth=OAuthSettings(IdentityProvider.MICROSOFT, Flow.CLIENT_CREDENTIALS,
                                          "https://login/t/oauth2/v2.0/token", "s", tenant="t",
                                          client_id="c", client_secret=Secret("x" * 8, "env:S")))
GMAIL = Upstream("c/g", "smtp.gmail.com", 587, TlsMode.STARTTLS, "p", username="a@b.test",
                 password=Secret("pw-123456", "env:G"), provider="google-workspace")
SENDGRID = Upstream("sendgrid", "smtp.sendgrid.net", 587, TlsMode.STARTTLS, "p", username="apikey",
                    password=Secret("SG.x", "env:SENDGRID_API_KEY"), provider="sendgrid")
MAILJET = Upstream("mailjet", "in-v3.mailjet.com", 587, TlsMode.STARTTLS, "p", username="k",
                   password=Secret("k2", "env:MAILJET_SECRET_KEY"), provider="mailjet")


@pytest.mark.parametrize(("upstream", "code", "text", "kind", "pause", "step"), [
    (M365, 535, "5.7.30 Basic authentication is not supported for Client Submission",
     "auth", True, "the tenant turned Basic auth off: switch this upstream to `auth: xoauth2`"),
    (M365, 535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the"
     " Tenant", "auth", True, "Set-CASMailbox"),
    (M365, 535, "5.7.3 Authentication unsuccessful", "auth", True, "credential:contoso"),
    (OAUTH_M365, 535, "5.7.3 Authentication unsuccessful", "auth", True, "SMTP.SendAsApp"),
    (M365, 530, "5.7.57 Client not authenticated to send mail", "auth", True, "credentials"),
    (M365, 550, "5.7.60 SMTP; Client does not have permissions to send as this sender",
     "policy", True, "from_address"),
    (OAUTH_M365, 454, "4.7.0 token request to https://login failed: invalid_client: AADSTS7000215:"
     " Invalid client secret provided.", "auth", True, "env:S"),
    (OAUTH_M365, 454, "4.7.0 token request to https://login failed: invalid_client: AADSTS65001:"
     " The user or administrator has not consented", "auth", True, "admin consent"),
    (OAUTH_M365, 454, "4.7.0 token request to https://login failed: unauthorized_client:"
     " AADSTS700016: Application with identifier 'c' was not found", "auth", True,
     "client_id c is not an application in tenant t"),
    (OAUTH_M365, 451, "4.4.1 token request to https://login failed: ConnectionError", "network",
     False, "did not answer"),
    (GMAIL, 550, "5.4.5 Daily user sending limit exceeded.", "rate", True, "daily"),
    (GMAIL, 535, "5.7.8 Username and Password not accepted. BadCredentials", "auth", True,
     "app password"),
    (SENDGRID, 451, "Authentication failed: Maximum credits exceeded", "rate", True, "credits"),
    (SENDGRID, 535, "Authentication failed: Bad username / password", "auth", True, "apikey"),
    (SENDGRID, 421, "4.7.0 Try again later, closing connection. (throttled)", "rate", False, ""),
    (MAILJET, 451, "4.7.1 Too many messages, slow down", "rate", False, ""),
    (MAILJET, 535, "5.7.8 Error: authentication failed", "auth", True, "env:MAILJET_SECRET_KEY"),
    (GMAIL, 550, "5.1.1 The email account that you tried to reach does not exist.", "hard",
     False, ""),
    # a recipient's full mailbox ("quota" in the event classes): that recipient only
    (M365, 452, "4.2.2 mailbox full", "quota", False, ""),
    (M365, 552, "5.2.2 mailbox full", "quota", False, ""),
    (M365, 550, "5.1.90 Your message can't be sent because you've reached your daily limit for"
     " message recipients", "rate", True, "10,000"),
])
def test_classify(upstream: Upstream, code: int, text: str, kind: str, pause: bool,
                  step: str) -> None:
    v = classify(upstream, parse_reply(code, text))
    assert (v.kind, v.pause) == (kind, pause) and kind in KINDS
    assert step in v.next_step
    if pause:
        p = v.as_pause(Reply(code, text))
        assert p is not None and p.reason == f"{code} {text}"
        assert (p.seconds is not None) == (kind == "rate")  # a sending limit: for an hour


# -- test connection: the token step --------------------------------------------------------


@pytest.fixture
def idp(ca: CertAuthority) -> Iterator[Idp]:
    with Idp(ca) as server:
        server.add_app("client-1", secret=SECRET, mailboxes={MAILBOX})
        yield server


def oauth_upstream(port: int, idp: Idp, ca: CertAuthority) -> Upstream:
    return Upstream(
        "contoso/m365", "mx.test", port, TlsMode.STARTTLS, "default", username=MAILBOX,
        ca_file=ca.ca_file, auth="xoauth2", provider="microsoft365",
        oauth=OAuthSettings(IdentityProvider.MICROSOFT, Flow.CLIENT_CREDENTIALS,
                            idp.endpoint("tenant-1"), "https://outlook.office365.com/.default",
                            tenant="tenant-1", client_id="client-1",
                            client_secret=Secret(SECRET, "credential:contoso-entra"),
                            ca_file=ca.ca_file, timeout=5.0))


async def test_test_connection_shows_the_token_step_and_never_the_token(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    def check(user: str, token: str) -> str | None:
        return None if idp.valid(token, user) else "535 5.7.3 Authentication unsuccessful"

    sink = await make_sink(tls="starttls", tls_context=ca.server_context("mx.test"), oauth=check,
                           plain_reply="535 5.7.30 Basic authentication is not supported for"
                           " Client Submission")
    up = oauth_upstream(sink.port, idp, ca)
    report = await probe(up, SOURCE, RESOLVER, timeout=5)
    assert report.ok, report.as_text()
    steps = {s.name: s for s in report.steps}
    token = steps["token"]
    assert idp.endpoint("tenant-1") in token.detail and "tenant tenant-1" in token.detail
    assert "client client-1" in token.detail and "valid 3600s" in token.detail
    assert steps["AUTH XOAUTH2"].reply is not None and steps["AUTH XOAUTH2"].reply.startswith("235")
    issued = next(iter(idp.issued))
    assert issued not in report.as_text() and SECRET not in report.as_text()

    # the same mailbox with its old password: Exchange's 5.7.30, and the plain next step
    old = Upstream("contoso/old", "mx.test", sink.port, TlsMode.STARTTLS, "default",
                   username=MAILBOX, password=Secret("old-password", "env:OLD"),
                   ca_file=ca.ca_file, provider="microsoft365")
    report = await probe(old, SOURCE, RESOLVER, timeout=5)
    assert not report.ok and report.steps[-1].name == "AUTH PLAIN"
    assert report.steps[-1].hint is not None and "`auth: xoauth2`" in report.steps[-1].hint

    # the secret revoked in Entra: the token step fails with the IdP's own words, no AUTH
    idp.revoke_secret("client-1")
    report = await probe(up, SOURCE, RESOLVER, timeout=5)
    assert not report.ok and report.steps[-1].name == "token"
    assert "AADSTS7000215" in report.steps[-1].detail
    assert report.steps[-1].hint is not None and "credential:contoso-entra" in report.steps[-1].hint
    assert not any(s.name.startswith("AUTH") for s in report.steps)


def test_a_pause_until_fixed_is_looked_at_again_with_one_delivery_doubling_to_an_hour() -> None:
    now = [0.0]
    h = UpstreamHealth(clock=lambda: now[0])
    auth = UpstreamPause("auth", "535 5.7.3 Authentication unsuccessful", "fix it")
    waits = []
    for _ in range(6):
        p = h.pause("c/m", auth)
        assert h.until("c/m") > now[0] and not h.probing("c/m")
        waits.append(p.until - now[0])
        now[0] = p.until
        assert h.probing("c/m")  # its time has come: one delivery looks again
    assert waits == [300.0, 600.0, 1200.0, 2400.0, 3600.0, 3600.0]
    snap = h.snapshot()["c/m"]
    assert snap["kind"] == "auth" and snap["until_fixed"] and snap["since"] == 0.0
    limit = UpstreamPause("rate", "550 5.4.5 Daily user sending limit exceeded", "wait", 3600.0)
    assert h.pause("g/w", limit).until == now[0] + 3600.0
    assert h.clear_kinds(("auth", "policy")) == ["c/m"]  # a reload: sending-limit pauses stay
    assert h.until("c/m") == 0.0 and h.until("g/w") > now[0]
    assert h.clear("g/w") and not h.clear("g/w")


@settings(max_examples=300, deadline=None)
@given(code=st.integers(min_value=-1, max_value=999), text=st.text(max_size=200),
       upstream=st.sampled_from([M365, OAUTH_M365, GMAIL, SENDGRID, MAILJET]))
def test_any_reply_classifies_without_raising(upstream: Upstream, code: int, text: str) -> None:
    v = classify(upstream, parse_reply(code, text))
    assert v.kind in (*KINDS, "delivered")
    assert not (v.pause and 200 <= code < 300)  # a success never pauses anything
