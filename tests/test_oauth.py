"""auth: xoauth2 against a real HTTPS identity provider (tests/idp.py) and a real SMTP sink
that accepts only AUTH XOAUTH2 / OAUTHBEARER with a currently valid token for the right
mailbox, and answers PLAIN like Exchange Online (535 5.7.139 / 5.7.30)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from relay.core.model import (
    EgressSource,
    Flow,
    IdentityProvider,
    OAuthSettings,
    Outcome,
    Secret,
    Upstream,
)
from relay.core.redact import REDACTOR
from relay.delivery import Deliverer, DnsResolver
from relay.oauth import FileShare, RedisShare, TokenBroker, TokenError
from tests.certs import CertAuthority
from tests.conftest import MakeSink
from tests.idp import IdentityProvider as Idp
from tests.redisproc import RedisServer
from tests.sinks import Sink, loopback_upstream

SRC = EgressSource("a", "127.0.0.2", "a.relay.test")
HOSTS = {"mx.test": ["127.0.0.1"]}
MAILBOX = "surveys@contoso.test"
SECRET = "entra-secret-value-1234"
MSG = b"From: surveys@contoso.test\r\nTo: r@example.test\r\nSubject: invite\r\n\r\nHi.\r\n"


@pytest.fixture
def idp(ca: CertAuthority) -> Iterator[Idp]:
    with Idp(ca) as server:
        server.add_app("client-1", secret=SECRET, mailboxes={MAILBOX})
        yield server


def exchange_sink(idp: Idp, make_sink: MakeSink, **kw: object) -> asyncio.Future[Sink]:
    """Exchange Online, as far as AUTH goes: tokens only, Basic auth disabled."""
    def check(user: str, token: str) -> str | None:
        return None if idp.valid(token, user) else "535 5.7.3 Authentication unsuccessful"

    return asyncio.ensure_future(make_sink(
        oauth=check, auth_require_tls=False,
        plain_reply="535 5.7.139 Authentication unsuccessful, basic authentication is disabled.",
        **kw,
    ))


def ms_settings(idp: Idp, ca: CertAuthority, **kw: object) -> OAuthSettings:
    values: dict[str, object] = {
        "idp": IdentityProvider.MICROSOFT,
        "flow": Flow.CLIENT_CREDENTIALS,
        "token_endpoint": idp.endpoint("tenant-1"),
        "scope": "https://outlook.office365.com/.default",
        "tenant": "tenant-1",
        "client_id": "client-1",
        "client_secret": Secret(SECRET, "env:ENTRA_SECRET"),
        "ca_file": ca.ca_file,
        "timeout": 5.0,
    }
    values.update(kw)
    return OAuthSettings(**values)  # type: ignore[arg-type]


def oauth_upstream(sink: Sink, settings: OAuthSettings, **kw: object) -> Upstream:
    return loopback_upstream(sink.port, auth="xoauth2", username=MAILBOX, oauth=settings,
                             provider="microsoft365", **kw)


async def deliver(d: Deliverer, up: Upstream, n: int = 1) -> list[Outcome]:
    out = []
    for i in range(n):
        res = await d.deliver(up, SRC, "app@saas.test", [f"r{i}@example.test"], MSG)
        out += [r.outcome for r in res]
    return out


async def test_client_credentials_deliver_with_one_token_and_never_log_it(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = await exchange_sink(idp, make_sink)
    broker = TokenBroker()
    d = Deliverer(DnsResolver(HOSTS), tokens=broker, max_idle_per_key=1)
    up = oauth_upstream(sink, ms_settings(idp, ca))
    try:
        # 5 sequential + 10 concurrent deliveries: one token request in all
        assert await deliver(d, up, 5) == [Outcome.DELIVERED] * 5
        results = await asyncio.gather(*(deliver(d, up) for _ in range(10)))
        assert [o for r in results for o in r] == [Outcome.DELIVERED] * 10
    finally:
        await d.close()
    assert idp.token_requests == 1 and broker.requests == 1
    assert len(sink.messages) == 15 and sink.oauth_users[0] == MAILBOX
    token = next(iter(idp.issued))
    assert token not in caplog.text and SECRET not in caplog.text
    assert REDACTOR(f"x {token} y {SECRET}") == "x [redacted] y [redacted]"


async def test_plain_is_refused_like_exchange_and_never_tried_for_an_oauth_upstream(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    sink = await exchange_sink(idp, make_sink)
    d = Deliverer(DnsResolver(HOSTS), tokens=TokenBroker())
    try:
        pw = loopback_upstream(sink.port, username=MAILBOX, password=Secret("old-pw-123", "env:X"))
        [res] = await d.deliver(pw, SRC, "a@saas.test", ["r@example.test"], MSG)
        assert res.outcome is Outcome.DEFERRED  # never bounced for a credential problem
        assert "5.7.139" in res.reply.text
        [res] = await d.deliver(oauth_upstream(sink, ms_settings(idp, ca)), SRC, "a@saas.test",
                                ["r@example.test"], MSG)
        assert res.outcome is Outcome.DELIVERED
    finally:
        await d.close()
    assert [s.commands.count("AUTH") for s in sink.sessions if s.auth_identity] == [1]


async def test_a_token_refused_by_the_server_is_refreshed_once_and_the_mail_goes(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    sink = await exchange_sink(idp, make_sink)
    broker = TokenBroker()
    d = Deliverer(DnsResolver(HOSTS), tokens=broker, max_idle_per_key=1)
    up = oauth_upstream(sink, ms_settings(idp, ca))
    try:
        assert await deliver(d, up) == [Outcome.DELIVERED]
        sink.drop_connections()
        await sink.wait_idle()
        idp.expire_all()  # the server no longer takes the token the relay believes valid
        results = await asyncio.gather(*(deliver(d, up) for _ in range(5)))
        assert [o for r in results for o in r] == [Outcome.DELIVERED] * 5
    finally:
        await d.close()
    assert idp.token_requests == 2  # one refresh, shared by every connection that saw 535


async def test_a_token_the_idp_refuses_defers_with_the_idps_words(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    sink = await exchange_sink(idp, make_sink)
    d = Deliverer(DnsResolver(HOSTS), tokens=TokenBroker())
    idp.revoke_secret("client-1")
    try:
        [res] = await d.deliver(oauth_upstream(sink, ms_settings(idp, ca)), SRC, "a@saas.test",
                                ["r@example.test"], MSG)
    finally:
        await d.close()
    assert res.outcome is Outcome.DEFERRED
    assert res.reply.code == 454 and "AADSTS7000215" in res.reply.text
    assert sink.sessions[0].commands.count("AUTH") == 0 and not sink.messages
    assert SECRET not in res.reply.text


def _certificate(key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay-app")])
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))


async def test_certificate_credential_and_google_service_account(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    thumb = _certificate(key).fingerprint(hashes.SHA1()).hex()
    idp.add_app("cert-app", public_key_pem=public, thumbprint=thumb, mailboxes={MAILBOX})
    idp.add_app("sa@proj.iam.test", public_key_pem=public, mailboxes={"hr@fabrikam.test"})
    sa_key = json.dumps({"type": "service_account", "client_email": "sa@proj.iam.test",
                         "private_key": pem, "private_key_id": "k1",
                         "token_uri": "https://oauth2.googleapis.com/token"})

    def check(user: str, token: str) -> str | None:
        return None if idp.valid(token, user) else "535 5.7.8 Username and Password not accepted"

    sink = await make_sink(oauth=check, oauth_style="google", auth_require_tls=False)
    d = Deliverer(DnsResolver(HOSTS), tokens=TokenBroker())
    cert_up = oauth_upstream(sink, ms_settings(
        idp, ca, client_id="cert-app", client_secret=None,
        certificate_key=Secret(pem, "file:key.pem"), certificate_thumbprint=thumb))
    google = OAuthSettings(IdentityProvider.GOOGLE, Flow.SERVICE_ACCOUNT, idp.google_endpoint,
                           "https://mail.google.com/", service_account_key=Secret(sa_key, "file:sa.json"),
                           ca_file=ca.ca_file, timeout=5.0)
    g_up = loopback_upstream(sink.port, id="g", auth="xoauth2", username="hr@fabrikam.test",
                             oauth=google, provider="google-workspace")
    wrong = loopback_upstream(sink.port, id="w", auth="xoauth2", username="ceo@fabrikam.test",
                              oauth=google, provider="google-workspace")
    try:
        assert await deliver(d, cert_up) == [Outcome.DELIVERED]
        assert await deliver(d, g_up) == [Outcome.DELIVERED]
        [res] = await d.deliver(wrong, SRC, "a@saas.test", ["r@example.test"], MSG)
    finally:
        await d.close()
    assert sink.oauth_users == [MAILBOX, "hr@fabrikam.test"]
    assert res.outcome is Outcome.DEFERRED and "unauthorized_client" in res.reply.text
    assert "client_credentials" in idp.grants and "urn:ietf:params:oauth:grant-type:jwt-bearer" in idp.grants


async def test_a_rotated_refresh_token_is_kept_by_the_relay_not_the_yaml(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink, tmp_path: Path
) -> None:
    idp.rotate_refresh = True
    first = idp.add_refresh_token("client-1", MAILBOX)
    sink = await exchange_sink(idp, make_sink)
    settings = ms_settings(idp, ca, flow=Flow.REFRESH_TOKEN, client_secret=None,
                           refresh_token=Secret(first, "file:rt"),
                           scope="https://outlook.office.com/SMTP.Send")
    up = oauth_upstream(sink, settings)
    for _ in range(2):  # two "restarts": a new broker each time, the same spool directory
        broker = TokenBroker(FileShare(tmp_path / "oauth"))
        d = Deliverer(DnsResolver(HOSTS), tokens=broker)
        try:
            assert await deliver(d, up) == [Outcome.DELIVERED]
        finally:
            await d.close()
        (tmp_path / "oauth").joinpath("x").touch()
        for f in (tmp_path / "oauth").glob("*.token"):
            f.unlink()  # the access token is gone; the refresh token must be the rotated one
    assert first not in idp.refresh_tokens and len(idp.refresh_tokens) == 1
    assert idp.token_requests == 2 and idp.refused == 0
    kept = next((tmp_path / "oauth").glob("*.refresh"))
    assert kept.stat().st_mode & 0o077 == 0


async def test_two_nodes_sharing_redis_make_one_token_request(
    idp: Idp, ca: CertAuthority, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = ms_settings(idp, ca)
    up = loopback_upstream(1, auth="xoauth2", username=MAILBOX, oauth=settings)
    brokers = [TokenBroker(RedisShare(redis_server.url, FileShare(tmp_path / f"node{i}")))
               for i in range(2)]
    try:
        tokens = await asyncio.gather(*(b.token(up) for b in brokers for _ in range(10)))
    finally:
        for b in brokers:
            await b.close()
    assert len({t.value for t in tokens}) == 1
    assert idp.token_requests == 1 and sum(b.requests for b in brokers) == 1


async def test_an_unreachable_token_endpoint_is_a_network_error(ca: CertAuthority) -> None:
    broker = TokenBroker()
    settings = OAuthSettings(IdentityProvider.MICROSOFT, Flow.CLIENT_CREDENTIALS,
                             "https://127.0.0.1:1/t/oauth2/v2.0/token", "s", tenant="t",
                             client_id="c", client_secret=Secret("abcdefgh", "env:S"),
                             ca_file=ca.ca_file, timeout=2.0)
    up = loopback_upstream(1, auth="xoauth2", username=MAILBOX, oauth=settings)
    with pytest.raises(TokenError) as info:
        await broker.token(up)
    assert info.value.network and "127.0.0.1:1" in info.value.text



async def test_the_token_endpoints_certificate_is_verified(
    idp: Idp, ca: CertAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = loopback_upstream(1, auth="xoauth2", username=MAILBOX, oauth=ms_settings(idp, ca, ca_file=None))
    with pytest.raises(TokenError) as info:
        await TokenBroker().token(up)  # the system's CAs do not know the test CA
    assert info.value.network and "CERTIFICATE_VERIFY_FAILED" in info.value.description
    assert idp.token_requests == 0
    # $REQUESTS_CA_BUNDLE (set system-wide on many machines) does not replace oauth.ca_file
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    token = await TokenBroker().token(
        loopback_upstream(1, auth="xoauth2", username=MAILBOX, oauth=ms_settings(idp, ca)))
    assert token.fetched and idp.token_requests == 1


async def test_oauthbearer_where_only_it_is_offered_and_a_google_refresh_token(
    idp: Idp, ca: CertAuthority, make_sink: MakeSink
) -> None:
    idp.add_app("web-client", secret="google-client-secret", mailboxes=set())
    rt = idp.add_refresh_token("web-client", "owner@gmail.test")
    refused: list[str] = []

    def check(user: str, token: str) -> str | None:
        if idp.valid(token, user):
            return None
        refused.append(user)
        return "535 5.7.8 Username and Password not accepted"

    sink = await make_sink(oauth=check, oauth_style="google", oauth_mechanisms=("OAUTHBEARER",),
                           auth_require_tls=False)
    settings = OAuthSettings(IdentityProvider.GOOGLE, Flow.REFRESH_TOKEN, idp.google_endpoint,
                             "https://mail.google.com/", client_id="web-client",
                             client_secret=Secret("google-client-secret", "env:GCS"),
                             refresh_token=Secret(rt, "file:rt"), ca_file=ca.ca_file, timeout=5.0)
    up = loopback_upstream(sink.port, auth="xoauth2", username="owner@gmail.test",
                           oauth=settings, provider="gmail")
    wrong = loopback_upstream(sink.port, id="w", auth="xoauth2", username="other@gmail.test",
                              oauth=settings, provider="gmail")
    d = Deliverer(DnsResolver(HOSTS), tokens=TokenBroker())
    try:
        assert await deliver(d, up) == [Outcome.DELIVERED]
        [res] = await d.deliver(wrong, SRC, "a@saas.test", ["r@example.test"], MSG)
    finally:
        await d.close()
    assert sink.oauth_users == ["owner@gmail.test"]
    # the token is for another mailbox: the error challenge, then 535, no endless retry
    assert res.outcome is Outcome.DEFERRED and res.reply.code == 535
    assert res.pause is not None and res.pause.kind == "auth"
    # one token per mailbox; the fresh one refused is not asked for again
    assert refused == ["other@gmail.test"] and idp.grants == ["refresh_token"] * 2


async def test_a_token_is_refreshed_before_it_expires(idp: Idp, ca: CertAuthority) -> None:
    now = [1000.0]
    broker = TokenBroker(clock=lambda: now[0])
    up = loopback_upstream(1, auth="xoauth2", username=MAILBOX, oauth=ms_settings(idp, ca))
    first = await broker.token(up)
    assert first.expires_at == 1000.0 + 3600 and first.fetched
    now[0] += 3600 - 301  # more than 5 minutes left: the cached one
    assert (await broker.token(up)).value == first.value
    now[0] += 2  # less than 5 minutes left: a new one, before the old one expires
    second = await broker.token(up)
    assert second.value != first.value and idp.token_requests == 2
    idp.lifetime = 60.0  # a short-lived token is renewed in the last tenth of its life
    now[0] += 3600
    third = await broker.token(up)
    now[0] += 53
    assert (await broker.token(up)).value == third.value
    now[0] += 2
    assert (await broker.token(up)).value != third.value and idp.token_requests == 4
