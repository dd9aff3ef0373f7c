"""SMTP AUTH with an OAuth 2.0 access token: XOAUTH2 (Google's and Microsoft's mechanism)
or OAUTHBEARER (RFC 7628) when only that is offered.

The token comes from the broker (relay.oauth); if the server refuses a token that came from
the cache (it expired early, or was revoked), the broker is asked for a new one and AUTH is
tried once more on the same connection (RFC 4954 allows a new AUTH after a failed one). A
token that was just fetched and is still refused is not retried: the token is not the
problem (no SMTP AUTH for the mailbox, no permission, wrong mailbox). Tokens never appear in
any text: the broker registered them with the redactor, and our own texts name the user.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import aiosmtplib

from relay.core.model import Reply, Upstream
from relay.delivery import outcome
from relay.oauth import Token, TokenBroker, TokenError


class OAuthProblem(Exception):
    """AUTH cannot even be tried: no token (the identity provider refused or did not answer;
    `token_error` has its words) or no OAuth mechanism offered. `reply` stands for it."""

    def __init__(self, reply: Reply, token_error: TokenError | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.token_error = token_error


def token_reply(exc: TokenError) -> Reply:
    """The reply a token failure stands for: an unreachable IdP is "no answer" (the queue
    pauses like for a dead host); a refusal is an authentication failure (4.7.0, deferred)."""
    if exc.network:
        return outcome.no_answer(exc.text)
    return outcome.synthesised(454, "4.7.0", exc.text)


def xoauth2_argument(username: str, token: str) -> bytes:
    return base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer_argument(username: str, token: str, host: str, port: int) -> bytes:
    gs2 = "n,a=" + username.replace("=", "=3D").replace(",", "=2C") + ","
    text = f"{gs2}\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01"
    return base64.b64encode(text.encode())


def mechanism(smtp: aiosmtplib.SMTP) -> str | None:
    methods = smtp.server_auth_methods
    if "xoauth2" in methods:
        return "XOAUTH2"
    if "oauthbearer" in methods:
        return "OAUTHBEARER"
    return None


async def send_auth(
    smtp: aiosmtplib.SMTP, mech: str, upstream: Upstream, token: str
) -> aiosmtplib.SMTPResponse:
    """One AUTH exchange; raises SMTPAuthenticationError with the server's final reply."""
    user = upstream.username or ""
    if mech == "XOAUTH2":
        arg = xoauth2_argument(user, token)
        abort = b""  # an empty line ends XOAUTH2's error challenge
    else:
        arg = oauthbearer_argument(user, token, upstream.host, upstream.port)
        abort = b"AQ=="  # RFC 7628 § 3.2.3: %x01 ends OAUTHBEARER's error challenge
    response = await smtp.execute_command(b"AUTH", mech.encode(), arg)
    if response.code == 334:  # the error as a challenge (JSON); the final reply follows
        response = await smtp.execute_command(abort)
    if response.code != 235:
        raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)
    return response


async def authenticate_oauth(
    smtp: aiosmtplib.SMTP, upstream: Upstream, peer: str, tokens: TokenBroker | None
) -> Token:
    """AUTH XOAUTH2/OAUTHBEARER as `upstream.username`. Raises OAuthProblem (nothing sent)
    or aiosmtplib's SMTPAuthenticationError (the server's reply). Returns the token used."""
    mech = mechanism(smtp)
    if mech is None or not smtp.supports_extension("auth"):
        have = " ".join(m.upper() for m in smtp.server_auth_methods) or "none"
        raise OAuthProblem(
            outcome.synthesised(
                454, "4.7.0",
                f"{upstream.host} at {peer} does not offer AUTH XOAUTH2 or OAUTHBEARER"
                f" (offered: {have}); needed to log in as {upstream.username}",
            )
        )
    if tokens is None:
        raise OAuthProblem(outcome.synthesised(454, "4.7.0", "no token broker configured"))
    try:
        token = await tokens.token(upstream)
    except TokenError as exc:
        raise OAuthProblem(token_reply(exc), exc) from exc
    try:
        await send_auth(smtp, mech, upstream, token.value)
        return token
    except aiosmtplib.SMTPAuthenticationError:
        if token.fetched or not smtp.is_connected:
            raise
    # A cached token was refused (expired early or revoked): one refresh, one retry.
    try:
        token = await tokens.token(upstream, reject=token.value)
    except TokenError as exc:
        raise OAuthProblem(token_reply(exc), exc) from exc
    await send_auth(smtp, mech, upstream, token.value)
    return replace(token, fetched=True)
