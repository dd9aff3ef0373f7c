"""The token requests themselves, through the identity providers' own libraries.

- Microsoft Entra: MSAL (`msal`), Microsoft's maintained library: client credentials with a
  secret or a certificate (it signs the client assertion), and the refresh-token grant.
- Google: `google-auth`, Google's maintained library: a service account with domain-wide
  delegation (it signs the JWT assertion, with `subject` = the mailbox), and the
  refresh-token grant.

Both are synchronous (requests): every call here runs in a worker thread (relay.oauth.broker).
Both are imported on the first token request, not with this module: together they are ~0.15 s
of every `relay` command's start (cryptography, requests), and most relays never ask for a
token.
Every failure becomes a `TokenError` carrying the identity provider's own error code and
description (`AADSTS7000215: Invalid client secret provided ...`), never a secret.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import google.oauth2.credentials
    import google.oauth2.service_account
    import msal
    import requests

from relay.core.model import Flow, IdentityProvider, OAuthSettings

MS_SUFFIX = "/oauth2/v2.0/token"


class TokenError(Exception):
    """A token request failed. `error` and `description` are the IdP's own words; `network`
    is True when the IdP was not reached (or answered garbage), i.e. nothing to fix here."""

    def __init__(
        self,
        endpoint: str,
        error: str,
        description: str = "",
        *,
        status: int | None = None,
        network: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.error = error
        self.description = " ".join(description.split())[:600]
        self.status = status
        self.network = network
        super().__init__(self.text)

    @property
    def text(self) -> str:
        what = f"{self.error}: {self.description}" if self.description else self.error
        return f"token request to {self.endpoint} failed: {what}"


@dataclass(frozen=True, slots=True)
class Grant:
    access_token: str
    expires_in: float  # seconds from when it was asked for
    refresh_token: str | None = None  # a rotated refresh token, when the IdP sent one


def http_session(ca_file: str | None, timeout: float) -> requests.Session:
    """A requests session that verifies TLS against `ca_file` (else the system's CAs) on
    every request: requests lets $REQUESTS_CA_BUNDLE override a session's own `verify`,
    but not a request's."""
    import requests

    session = requests.Session()
    verify: str | bool = ca_file or True
    session.verify = verify
    session.request = functools.partial(  # type: ignore[method-assign]
        session.request, verify=verify, timeout=timeout
    )
    return session


def _google_request(session: requests.Session, timeout: float) -> Any:
    """google-auth's transport with our timeout on every call."""
    import google.auth.transport.requests

    class _Request(google.auth.transport.requests.Request):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = timeout
            return super().__call__(*args, **kwargs)

    return _Request(session)


class Flows:
    """Token requests for any upstream. MSAL applications are kept per client (they hold the
    tenant's discovered endpoints); every request bypasses MSAL's own token cache, since the
    broker decides when a token is needed."""

    def __init__(self) -> None:
        self._apps: dict[tuple[str, ...], msal.ClientApplication] = {}
        self._lock = threading.Lock()

    def fetch(self, s: OAuthSettings, username: str, refresh_token: str | None) -> Grant:
        import google.auth.exceptions
        import requests

        try:
            if s.idp is IdentityProvider.MICROSOFT:
                return self._microsoft(s, refresh_token)
            return self._google(s, username, refresh_token)
        except TokenError:
            raise
        except requests.RequestException as exc:
            raise TokenError(s.token_endpoint, type(exc).__name__, _short(exc), network=True) from None
        except google.auth.exceptions.TransportError as exc:
            raise TokenError(s.token_endpoint, "TransportError", _short(exc), network=True) from None
        except google.auth.exceptions.RefreshError as exc:
            data = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], dict) else {}
            raise TokenError(
                s.token_endpoint,
                str(data.get("error") or "refresh_error"),
                str(data.get("error_description") or (exc.args[0] if exc.args else "")),
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            # A malformed key (not JSON, not PEM), or an authority MSAL cannot discover.
            raise TokenError(s.token_endpoint, "configuration", _short(exc)) from None

    def forget(self, s: OAuthSettings) -> None:
        """Drop the MSAL applications for this client: MSAL keeps an HTTP 400 answer for a
        minute and would repeat it, after a fix made at the identity provider, to a test
        that just succeeded with the same request."""
        if s.idp is not IdentityProvider.MICROSOFT or not s.token_endpoint.endswith(MS_SUFFIX):
            return
        authority = s.token_endpoint[: -len(MS_SUFFIX)]
        with self._lock:
            for key in [k for k in self._apps if k[0] == authority and k[1] == (s.client_id or "")]:
                del self._apps[key]

    # -- Microsoft ----------------------------------------------------------------------
    def _app(self, s: OAuthSettings) -> msal.ClientApplication:
        import msal

        if not s.token_endpoint.endswith(MS_SUFFIX):
            raise TokenError(s.token_endpoint, "configuration",
                             f"a Microsoft token endpoint ends with {MS_SUFFIX}")
        authority = s.token_endpoint[: -len(MS_SUFFIX)]
        credential: str | dict[str, str] | None = None
        if s.certificate_key is not None:
            credential = {"private_key": s.certificate_key.reveal(),
                          "thumbprint": s.certificate_thumbprint or ""}
        elif s.client_secret is not None:
            credential = s.client_secret.reveal()
        key = (authority, s.client_id or "", str(hash(json.dumps(credential, sort_keys=True))),
               s.ca_file or "")
        with self._lock:
            app = self._apps.get(key)
            if app is None:
                common: dict[str, Any] = {
                    "authority": authority,
                    "validate_authority": False,
                    "instance_discovery": False,
                    "http_client": http_session(s.ca_file, s.timeout),
                }
                if credential is None:
                    app = msal.PublicClientApplication(s.client_id, **common)
                else:
                    app = msal.ConfidentialClientApplication(
                        s.client_id, client_credential=credential, **common
                    )
                self._apps[key] = app
        return app

    def _microsoft(self, s: OAuthSettings, refresh_token: str | None) -> Grant:
        import msal

        app = self._app(s)
        scopes = s.scope.split()
        if s.flow is Flow.REFRESH_TOKEN:
            if not refresh_token:
                raise TokenError(s.token_endpoint, "configuration", "no refresh token")
            result = app.acquire_token_by_refresh_token(refresh_token, scopes=scopes)
        else:
            assert isinstance(app, msal.ConfidentialClientApplication)
            app.remove_tokens_for_client()  # the broker asked: a new token, not MSAL's cached one
            result = app.acquire_token_for_client(scopes=scopes)
        if not isinstance(result, dict) or "access_token" not in result:
            data = result if isinstance(result, dict) else {}
            raise TokenError(
                s.token_endpoint,
                str(data.get("error") or "no_token"),
                str(data.get("error_description") or ""),
            )
        return Grant(
            str(result["access_token"]),
            float(result.get("expires_in") or 3600),
            result.get("refresh_token"),
        )

    # -- Google -------------------------------------------------------------------------
    def _google(self, s: OAuthSettings, username: str, refresh_token: str | None) -> Grant:
        import google.oauth2.credentials
        import google.oauth2.service_account

        session = http_session(s.ca_file, s.timeout)
        request = _google_request(session, s.timeout)
        creds: google.oauth2.service_account.Credentials | google.oauth2.credentials.Credentials
        try:
            if s.flow is Flow.SERVICE_ACCOUNT:
                assert s.service_account_key is not None
                info = json.loads(s.service_account_key.reveal())
                if not isinstance(info, dict):
                    raise ValueError("the service account key is not a JSON object")
                info["token_uri"] = s.token_endpoint
                creds = google.oauth2.service_account.Credentials.from_service_account_info(
                    info, scopes=s.scope.split(), subject=username
                )
            else:
                if not refresh_token:
                    raise TokenError(s.token_endpoint, "configuration", "no refresh token")
                creds = google.oauth2.credentials.Credentials(
                    None,
                    refresh_token=refresh_token,
                    token_uri=s.token_endpoint,
                    client_id=s.client_id,
                    client_secret=s.client_secret.reveal() if s.client_secret else None,
                    scopes=s.scope.split(),
                )
            creds.refresh(request)
        finally:
            session.close()
        expiry = creds.expiry
        # google-auth keeps expiry as a naive UTC datetime
        expires_in = expiry.replace(tzinfo=dt.UTC).timestamp() - time.time() if expiry else 3600.0
        rotated = getattr(creds, "refresh_token", None)
        return Grant(str(creds.token), expires_in,
                     rotated if rotated and rotated != refresh_token else None)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
