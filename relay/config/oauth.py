"""`auth: xoauth2`: the `oauth:` block of an upstream checked and resolved into `OAuthSettings`.

Which flow a block means follows from what it names (a service account key → Google's
service account flow; a refresh token → the delegated flow; else Entra client credentials)
unless `flow:` says so. Errors are `(key path, message)` pairs for the builder to place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from relay.config.schema import OAuthConf
from relay.config.secrets import resolve_secret
from relay.core.model import Flow, IdentityProvider, OAuthSettings, Secret

MS_TOKEN = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
GOOGLE_TOKEN = "https://oauth2.googleapis.com/token"
SCOPES = {
    # app-only: the .default scope of Exchange Online; delegated: SMTP.Send (+ offline_access
    # for the refresh token itself)
    (IdentityProvider.MICROSOFT, Flow.CLIENT_CREDENTIALS): "https://outlook.office365.com/.default",
    (IdentityProvider.MICROSOFT, Flow.REFRESH_TOKEN): "https://outlook.office.com/SMTP.Send offline_access",
    (IdentityProvider.GOOGLE, Flow.SERVICE_ACCOUNT): "https://mail.google.com/",
    (IdentityProvider.GOOGLE, Flow.REFRESH_TOKEN): "https://mail.google.com/",
}

Problem = tuple[tuple[str, ...], str]


def _flow(conf: OAuthConf) -> Flow:
    if conf.flow:
        return Flow(conf.flow)
    if conf.service_account_key:
        return Flow.SERVICE_ACCOUNT
    if conf.refresh_token:
        return Flow.REFRESH_TOKEN
    return Flow.CLIENT_CREDENTIALS


def check(conf: OAuthConf | None, idp_default: str | None, username: str | None) -> list[Problem]:
    """What is missing or contradictory (no secret is read here)."""
    if conf is None:
        return [((), "auth: xoauth2 needs an oauth: block (tenant, client_id, client_secret, ...)")]
    out: list[Problem] = []
    idp = conf.idp or idp_default
    if idp is None:
        out.append((("oauth",), "oauth needs idp: microsoft or google (or a provider: profile)"))
        return out
    flow = _flow(conf)
    if not username:
        out.append(((), "auth: xoauth2 needs username: the mailbox to send as"))
    need: list[str] = []
    if idp == "microsoft":
        if flow is Flow.SERVICE_ACCOUNT:
            out.append((("oauth", "flow"), "Microsoft has no service_account flow: use"
                        " client_credentials (app-only) or refresh_token"))
        if flow is Flow.CLIENT_CREDENTIALS:
            need = ["tenant", "client_id"]
            if bool(conf.client_secret) == bool(conf.certificate_key):
                out.append((("oauth",), "client_credentials needs client_secret or certificate_key"
                            " (with certificate_thumbprint), exactly one"))
            if conf.certificate_key and not conf.certificate_thumbprint:
                out.append((("oauth", "certificate_key"), "certificate_key needs"
                            " certificate_thumbprint (the certificate's SHA-1, hex)"))
        if not conf.tenant and not conf.token_endpoint:
            need.append("tenant")
    else:
        if flow is Flow.CLIENT_CREDENTIALS:
            out.append((("oauth",), "Google mailboxes use service_account_key (domain-wide"
                        " delegation) or refresh_token with client_id and client_secret"))
        if flow is Flow.SERVICE_ACCOUNT:
            need = ["service_account_key"]
    if flow is Flow.REFRESH_TOKEN:
        need += ["client_id", "refresh_token"]
        if idp == "google":
            need.append("client_secret")
    missing = sorted({k for k in need if not getattr(conf, k)})
    if missing:
        out.append((("oauth",), f"oauth ({idp} {flow.value}) needs {', '.join(missing)}"))
    return out


def settings(
    conf: OAuthConf, idp_default: str | None, base_dir: Path, environ: Mapping[str, str]
) -> OAuthSettings:
    """Resolved settings (raises SecretUnavailable for a reference that resolves to nothing)."""
    idp = IdentityProvider(conf.idp or idp_default or "microsoft")
    flow = _flow(conf)

    def secret(ref: str | None) -> Secret | None:
        return resolve_secret(ref, base_dir=base_dir, environ=environ) if ref else None

    endpoint = conf.token_endpoint or (
        MS_TOKEN.format(tenant=conf.tenant) if idp is IdentityProvider.MICROSOFT else GOOGLE_TOKEN
    )
    return OAuthSettings(
        idp=idp,
        flow=flow,
        token_endpoint=endpoint,
        scope=conf.scope or SCOPES.get((idp, flow), "https://mail.google.com/"),
        tenant=conf.tenant,
        client_id=conf.client_id,
        client_secret=secret(conf.client_secret),
        certificate_key=secret(conf.certificate_key),
        certificate_thumbprint=(conf.certificate_thumbprint or "").replace(":", "") or None,
        service_account_key=secret(conf.service_account_key),
        refresh_token=secret(conf.refresh_token),
        ca_file=str(base_dir / conf.ca_file) if conf.ca_file else None,
        timeout=conf.timeout,
    )


def identity(conf: OAuthConf | None) -> str:
    """What names this login for the verification fingerprint (references, never values)."""
    if conf is None:
        return ""
    keys = ("idp", "flow", "tenant", "client_id", "client_secret", "certificate_key",
            "certificate_thumbprint", "service_account_key", "refresh_token", "token_endpoint",
            "scope")
    return "|".join(f"{k}={getattr(conf, k) or ''}" for k in keys)


def fingerprint(
    host: str,
    port: int,
    tls: str,
    username: str,
    auth: str,
    password_ref: str | None,
    conf: OAuthConf | None,
    username_ref: str | None,
) -> str:
    """What verification is tied to: host, port, TLS, user and which credentials (their
    references and OAuth identity). The secret values are added by the verification store,
    keyed with its own secret (relay/spool/verification.py), so no hash of a password is
    ever written anywhere."""
    text = "\x00".join(
        [host.lower(), str(port), tls, username_ref or username.lower(), auth,
         password_ref or "", identity(conf)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:32]
