"""Access tokens for `auth: xoauth2` upstreams: cached, refreshed before they expire, one
refresh at a time, never logged.

`TokenBroker.token(upstream)` returns a token that has at least `margin` of life left:
from memory; else, holding this process's lock for that login *and* the share's turn
(relay.oauth.shared: a file lock for the workers of a machine, Redis for nodes), from the
share if another process refreshed meanwhile; else from the identity provider
(relay.oauth.flows, in a thread). So a hundred delivery tasks on ten workers make one token
request per token lifetime. `token(upstream, reject=old)` is for a server that refused
`old`: it returns a different token (one refresh, shared by everyone who saw `old` fail).

Every token, client secret, private key and refresh token is registered with the process's
redactor (relay.core.redact) before it can reach any text. A refresh token rotated by the
provider is kept durably in the share (spool/oauth/KEY.refresh), never written to YAML: the
configured reference stays the first one, and a new value there (the admin consented again)
wins over the kept one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from relay.core.model import Flow, OAuthSettings, Upstream
from relay.core.redact import REDACTOR
from relay.oauth.flows import Flows, Grant, TokenError
from relay.oauth.shared import Share

log = logging.getLogger("relay.oauth")

MAX_MARGIN = 300.0  # refresh at most 5 minutes before expiry...
MARGIN_SHARE = 0.1  # ...or in the last tenth of a short-lived token's life
NEGATIVE_TTL = 10.0  # a refused or failed token request is not repeated sooner


@dataclass(frozen=True, slots=True)
class Token:
    value: str
    expires_at: float
    obtained_at: float
    fetched: bool = False  # this call asked the identity provider (not a cache)

    @property
    def lifetime(self) -> float:
        return self.expires_at - self.obtained_at

    def usable(self, now: float) -> bool:
        margin = min(MAX_MARGIN, MARGIN_SHARE * max(0.0, self.lifetime))
        return self.expires_at - margin > now


def login_key(upstream: Upstream) -> str:
    """One cache entry per login (IdP client, mailbox, scope, credential references): two
    upstreams with the same login share a token; no secret value goes into the key."""
    s = upstream.oauth
    assert s is not None
    parts = [s.idp.value, s.flow.value, s.token_endpoint, s.client_id or "", s.tenant or "",
             s.scope, (upstream.username or "").lower(),
             *[x.source for x in s.secrets()]]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class TokenBroker:
    def __init__(
        self,
        share: Share | None = None,
        *,
        flows: Flows | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.share = share
        self.flows = flows or Flows()
        self.clock = clock
        self._tokens: dict[str, Token] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.requests = 0  # token requests this process made (tests, metrics)
        self.last_error: dict[str, TokenError] = {}
        self._failed: dict[str, tuple[float, TokenError, int]] = {}
        self._rotated: dict[str, dict[str, str]] = {}  # without a share: kept in memory

    async def close(self) -> None:
        if self.share is not None:
            await self.share.close()

    def forget(self, upstream: Upstream) -> None:
        """Drop what this process remembers for this login (its token, a refusal)."""
        key = login_key(upstream)
        self._tokens.pop(key, None)
        self._failed.pop(key, None)
        if upstream.oauth is not None:
            self.flows.forget(upstream.oauth)

    async def token(self, upstream: Upstream, *, reject: str | None = None) -> Token:
        """A usable token for `upstream` (raises TokenError with the IdP's words)."""
        if upstream.oauth is None:
            raise TokenError("-", "configuration", f"upstream {upstream.id} has no oauth settings")
        for s in upstream.oauth.secrets():
            REDACTOR.add(s.reveal())
        key = login_key(upstream)
        now = self.clock()
        t = self._tokens.get(key)
        if t is not None and t.value != reject and t.usable(now):
            return t
        lock = self._locks.setdefault(key, asyncio.Lock())
        asked = self.clock()
        async with lock:
            t = self._tokens.get(key)
            if t is not None and t.value != reject and t.usable(self.clock()):
                return t
            # The request we waited for failed, or one failed moments ago with these same
            # credentials: the same answer for all (an identity provider is not asked again
            # by every delivery under way; new credentials after a reload are asked at once).
            creds = hash(tuple(x.reveal() for x in upstream.oauth.secrets()))
            failed = self._failed.get(key)
            if failed is not None and failed[2] == creds and (
                failed[0] >= asked or self.clock() - failed[0] < NEGATIVE_TTL
            ):
                raise failed[1]
            try:
                t = await self._refresh(upstream, key, reject)
            except TokenError as exc:
                self._failed[key] = (self.clock(), exc, creds)
                raise
            self._failed.pop(key, None)
            self._tokens[key] = replace(t, fetched=False)  # later callers got it from memory
            return t

    async def _refresh(self, upstream: Upstream, key: str, reject: str | None) -> Token:
        if self.share is None:
            return await self._fetch(upstream, key)
        async with self.share.turn(key):
            shared = await self.share.load(key)
            if shared is not None:
                try:
                    t = Token(str(shared["access_token"]), float(shared["expires_at"]),
                              float(shared["obtained_at"]))
                except (KeyError, TypeError, ValueError):
                    t = None
                if t is not None and t.value != reject and t.usable(self.clock()):
                    REDACTOR.add(t.value)
                    return t
            t = await self._fetch(upstream, key)
            await self.share.save(key, {"access_token": t.value, "expires_at": t.expires_at,
                                        "obtained_at": t.obtained_at})
            return t

    async def _fetch(self, upstream: Upstream, key: str) -> Token:
        s = upstream.oauth
        assert s is not None
        refresh = await self._refresh_token(s, key) if s.flow is Flow.REFRESH_TOKEN else None
        self.requests += 1
        started = self.clock()
        try:
            async with asyncio.timeout(s.timeout + 5):
                grant: Grant = await asyncio.to_thread(
                    self.flows.fetch, s, upstream.username or "", refresh
                )
        except TimeoutError:
            err = TokenError(s.token_endpoint, "timeout",
                             f"no answer within {s.timeout + 5:g}s", network=True)
            self.last_error[upstream.id] = err
            raise err from None
        except TokenError as exc:
            self.last_error[upstream.id] = exc
            log.warning("upstream %s: %s", upstream.id, exc.text)
            raise
        REDACTOR.add(grant.access_token)
        self.last_error.pop(upstream.id, None)
        if grant.refresh_token:
            REDACTOR.add(grant.refresh_token)
            await self._keep_refresh_token(s, key, grant.refresh_token)
        log.info("upstream %s: new access token from %s (valid %.0fs)", upstream.id,
                 s.token_endpoint, grant.expires_in)
        return Token(grant.access_token, started + grant.expires_in, started, fetched=True)

    async def _refresh_token(self, s: OAuthSettings, key: str) -> str | None:
        configured = s.refresh_token.reveal() if s.refresh_token else None
        if configured is None:
            return None
        kept: dict[str, Any] | None = (
            self._rotated.get(key) if self.share is None else await self.share.load_refresh(key)
        )
        if (
            kept is not None
            and kept.get("origin") == _digest(configured)
            and isinstance(kept.get("refresh_token"), str)
        ):
            REDACTOR.add(kept["refresh_token"])
            return str(kept["refresh_token"])
        return configured

    async def _keep_refresh_token(self, s: OAuthSettings, key: str, rotated: str) -> None:
        configured = s.refresh_token.reveal() if s.refresh_token else None
        if configured is None:
            return
        record = {"origin": _digest(configured), "refresh_token": rotated}
        if self.share is None:
            self._rotated[key] = record
        else:
            await self.share.save_refresh(key, record)
