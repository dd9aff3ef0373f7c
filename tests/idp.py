"""A real identity provider for tests: an HTTPS token endpoint (aiohttp + trustme) speaking
like Microsoft Entra and Google, on 127.0.0.1, on its own thread and event loop.

    with IdentityProvider(ca) as idp:
        idp.add_app("client-1", secret="s3cret", mailboxes={"surveys@contoso.test"})
        idp.endpoint("tenant-1")           # https://127.0.0.1:PORT/tenant-1/oauth2/v2.0/token
        idp.valid(token, "surveys@contoso.test")   # what the XOAUTH2 sink asks
        idp.token_requests                 # POSTs that issued or refused a token
        idp.expire_all(); idp.revoke_secret("client-1")

Microsoft: tenant discovery (`/{tenant}/v2.0/.well-known/openid-configuration`) and
`/{tenant}/oauth2/v2.0/token` for client credentials (secret or certificate assertion,
verified with the certificate's public key) and refresh tokens (rotated on use when asked).
Google: `/google/token` for the service-account JWT bearer grant (signature verified,
`sub` = the mailbox) and refresh tokens. Errors are the providers' own shapes
(`AADSTS7000215: Invalid client secret provided ...`, `invalid_grant`).
"""

from __future__ import annotations

import asyncio
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from tests.certs import CertAuthority


@dataclass
class App:
    client_id: str
    secret: str | None = None
    public_key_pem: bytes | None = None  # certificate credential / service account key
    thumbprint: str | None = None
    mailboxes: set[str] = field(default_factory=set)  # app-only: mailboxes it may send as
    consented: bool = True


@dataclass
class Issued:
    token: str
    mailbox: str | None  # None: app-only (any of the app's mailboxes)
    client_id: str
    expires_at: float
    revoked: bool = False


class IdentityProvider:
    def __init__(self, ca: CertAuthority, *, lifetime: float = 3600.0) -> None:
        self.ca = ca
        self.lifetime = lifetime  # expires_in of new tokens
        self.apps: dict[str, App] = {}
        self.issued: dict[str, Issued] = {}
        self.refresh_tokens: dict[str, tuple[str, str]] = {}  # token -> (client_id, mailbox)
        self.rotate_refresh = False
        self.token_requests = 0
        self.refused = 0
        self.discoveries = 0
        self.grants: list[str] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- set-up --------------------------------------------------------------------------
    def add_app(self, client_id: str, *, secret: str | None = None,
                public_key_pem: bytes | None = None, thumbprint: str | None = None,
                mailboxes: set[str] | None = None) -> App:
        app = App(client_id, secret, public_key_pem, thumbprint, set(mailboxes or ()))
        self.apps[client_id] = app
        return app

    def add_refresh_token(self, client_id: str, mailbox: str) -> str:
        rt = "rt-" + secrets.token_urlsafe(24)
        self.refresh_tokens[rt] = (client_id, mailbox)
        return rt

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def endpoint(self, tenant: str) -> str:
        return f"{self.base}/{tenant}/oauth2/v2.0/token"

    @property
    def google_endpoint(self) -> str:
        return f"{self.base}/google/token"

    # -- what the sink asks, and what tests change -----------------------------------------
    def valid(self, token: str, mailbox: str) -> bool:
        with self._lock:
            t = self.issued.get(token)
            if t is None or t.revoked or t.expires_at <= time.time():
                return False
            if t.mailbox is not None:
                return t.mailbox.lower() == mailbox.lower()
            app = self.apps.get(t.client_id)
            return app is not None and mailbox.lower() in app.mailboxes

    def expire_all(self) -> None:
        """Every token issued so far stops working (the clients still think they are fine)."""
        with self._lock:
            for t in self.issued.values():
                t.revoked = True

    def revoke_secret(self, client_id: str) -> None:
        self.apps[client_id].secret = "revoked-" + secrets.token_hex(8)
        self.expire_all()

    # -- the server ----------------------------------------------------------------------
    def start(self) -> IdentityProvider:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="idp", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tenant}/v2.0/.well-known/openid-configuration", self._discovery)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self._ms_token)
        app.router.add_post("/google/token", self._google_token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx: ssl.SSLContext = self.ca.server_context("127.0.0.1")
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> IdentityProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers ------------------------------------------------------------------------
    async def _discovery(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        self.discoveries += 1
        return web.json_response({
            "token_endpoint": self.endpoint(tenant),
            "authorization_endpoint": f"{self.base}/{tenant}/oauth2/v2.0/authorize",
            "issuer": f"{self.base}/{tenant}/v2.0",
        })

    def _issue(self, client_id: str, mailbox: str | None, refresh: str | None = None) -> web.Response:
        token = "at-" + secrets.token_urlsafe(32)
        with self._lock:
            self.issued[token] = Issued(token, mailbox, client_id, time.time() + self.lifetime)
        body: dict[str, Any] = {"token_type": "Bearer", "expires_in": int(self.lifetime),
                                "access_token": token}
        if refresh:
            body["refresh_token"] = refresh
        return web.json_response(body)

    @staticmethod
    def _ms_error(error: str, code: str, text: str, status: int = 400) -> web.Response:
        return web.json_response(
            {"error": error, "error_description": f"{code}: {text} Trace ID: 0000 Timestamp: now",
             "error_codes": [int(code[6:])]},
            status=status,
        )

    async def _ms_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests += 1
        grant = str(form.get("grant_type"))
        self.grants.append(grant)
        client_id = str(form.get("client_id"))
        app = self.apps.get(client_id)
        if app is None:
            self.refused += 1
            return self._ms_error("unauthorized_client", "AADSTS700016",
                                  f"Application with identifier '{client_id}' was not found in"
                                  " the directory.")
        if grant == "refresh_token":
            rt = str(form.get("refresh_token"))
            owner = self.refresh_tokens.get(rt)
            if owner is None or owner[0] != client_id:
                self.refused += 1
                return self._ms_error("invalid_grant", "AADSTS70000",
                                      "The provided value for the 'refresh_token' is not valid.")
            new_rt = None
            if self.rotate_refresh:
                del self.refresh_tokens[rt]
                new_rt = self.add_refresh_token(client_id, owner[1])
            return self._issue(client_id, owner[1], new_rt)
        if grant != "client_credentials":
            return self._ms_error("unsupported_grant_type", "AADSTS70003", "unsupported grant")
        if "client_assertion" in form:
            try:
                assert app.public_key_pem is not None
                jwt.decode(str(form["client_assertion"]), app.public_key_pem,
                           algorithms=["RS256", "PS256"], options={"verify_aud": False})
            except (jwt.PyJWTError, AssertionError):
                self.refused += 1
                return self._ms_error("invalid_client", "AADSTS700027",
                                      "Client assertion contains an invalid signature.", 401)
        elif form.get("client_secret") != app.secret or app.secret is None:
            self.refused += 1
            return self._ms_error("invalid_client", "AADSTS7000215",
                                  "Invalid client secret provided. Ensure the secret being sent"
                                  " in the request is the client secret value, not the client"
                                  f" secret ID, for a secret added to app '{client_id}'.", 401)
        if not app.consented:
            self.refused += 1
            return self._ms_error("invalid_client", "AADSTS65001",
                                  "The user or administrator has not consented to use the"
                                  f" application with ID '{client_id}'.")
        return self._issue(client_id, None)

    async def _google_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.token_requests += 1
        grant = str(form.get("grant_type"))
        self.grants.append(grant)
        if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            assertion = str(form.get("assertion"))
            try:
                claims = jwt.decode(assertion, options={"verify_signature": False})
                app = self.apps[str(claims["iss"])]
                assert app.public_key_pem is not None
                jwt.decode(assertion, app.public_key_pem, algorithms=["RS256"],
                           audience="https://oauth2.googleapis.com/token")  # as Google checks
            except (jwt.PyJWTError, KeyError, AssertionError):
                self.refused += 1
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "Invalid JWT Signature."}, status=400)
            mailbox = str(claims.get("sub") or "")
            if mailbox.lower() not in app.mailboxes:
                self.refused += 1
                return web.json_response(
                    {"error": "unauthorized_client", "error_description": "Client is"
                     " unauthorized to retrieve access tokens using this method, or client not"
                     " authorized for any of the scopes requested."}, status=401)
            return self._issue(app.client_id, mailbox)
        if grant == "refresh_token":
            rt = str(form.get("refresh_token"))
            owner = self.refresh_tokens.get(rt)
            app = self.apps.get(str(form.get("client_id")))
            if owner is None or app is None or form.get("client_secret") != app.secret:
                self.refused += 1
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "Token has been expired or revoked."},
                                         status=400)
            return self._issue(owner[0], owner[1])
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
