"""Limit state in Redis, shared by every node: one atomic step per decision.

Counting windows are the `limits` library's Redis strategies (their Lua scripts). Leases,
minimum intervals and pauses are three short Lua scripts of ours; each reads Redis's own
clock (TIME), so nodes with skewed clocks still agree. A lease is a member of a sorted set
scored by its expiry: a node that crashes stops renewing and its slots free up after
`lease_ttl`. Every call has a short socket timeout and no retries: a dead Redis must be
noticed in well under a second so the node can fall back (relay.limits.failover).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from limits.aio.storage import RedisStorage

from relay.core import redisclient
from relay.limits.store import BackendError, Lease, Store

P = ParamSpec("P")
R = TypeVar("R")

PREFIX = "relay"

_NOW_MS = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# KEYS[1] lease set; ARGV limit, ttl_ms, token → 1 (granted) or 0.
_LEASE = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
"""
)

# KEYS[1] lease set; ARGV ttl_ms, tokens... → renews the ones still held.
_RENEW = (
    _NOW_MS
    + """
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 0
"""
)

# KEYS[1] lease set → live leases.
_COUNT = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""
)

# KEYS[1] next allowed start (ms); ARGV interval_ms → 0 (reserved) or ms to wait.
_SPACE = (
    _NOW_MS
    + """
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
if nxt > now then return nxt - now end
local interval = tonumber(ARGV[1])
redis.call('SET', KEYS[1], now + interval, 'PX', interval + 1000)
return 0
"""
)

# KEYS[1] pause; ARGV ms, reason → sets the pause unless a longer one is already running.
_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], ARGV[2], 'PX', ms) end
return 0
"""


def _translated(
    method: Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, R]]:
    """Redis's own errors leave the store as BackendError (relay.limits.failover catches
    that, and never imports redis-py)."""

    async def wrapper(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except self.redis_error as exc:
            raise BackendError(f"Redis: {exc}") from exc

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


class RedisStore(Store):
    shared = True

    def __init__(self, url: str, *, node_id: str, timeout: float = 0.5) -> None:
        self.redis = redisclient.client(url, timeout)
        self.redis_error = redisclient.redis_error()
        storage = RedisStorage(
            "async+" + url,
            wrap_exceptions=True,  # the library's errors as limits.errors.StorageError
            implementation="redispy",
            key_prefix=f"{PREFIX}:limits",
            connection_pool=self.redis.connection_pool,  # type: ignore[arg-type]
        )
        super().__init__(storage, node_id)
        self._lease = self.redis.register_script(_LEASE)
        self._renew = self.redis.register_script(_RENEW)
        self._count = self.redis.register_script(_COUNT)
        self._space = self.redis.register_script(_SPACE)
        self._pause = self.redis.register_script(_PAUSE)

    @staticmethod
    def _key(kind: str, key: str) -> str:
        return f"{PREFIX}:{kind}:{key}"

    @_translated
    async def ping(self) -> None:
        await self.redis.ping()

    @_translated
    async def lease(self, key: str, limit: int, ttl: float) -> Lease | None:
        token = self._token()
        got = await self._lease(
            keys=[self._key("lease", key)], args=[limit, int(ttl * 1000), token]
        )
        return Lease(self, key, token) if int(got) else None

    @_translated
    async def unlease(self, lease: Lease) -> None:
        await self.redis.zrem(self._key("lease", lease.key), lease.token)

    @_translated
    async def renew(self, leases: Sequence[Lease], ttl: float) -> None:
        by_key: dict[str, list[str]] = {}
        for lease in leases:
            by_key.setdefault(lease.key, []).append(lease.token)
        for key, tokens in by_key.items():
            await self._renew(keys=[self._key("lease", key)], args=[int(ttl * 1000), *tokens])

    @_translated
    async def leases(self, key: str) -> int:
        return int(await self._count(keys=[self._key("lease", key)]))

    @_translated
    async def space(self, key: str, interval: float) -> float:
        ms = await self._space(keys=[self._key("next", key)], args=[max(1, int(interval * 1000))])
        return int(ms) / 1000.0

    @_translated
    async def pause(self, key: str, seconds: float, reason: str = "") -> None:
        await self._pause(
            keys=[self._key("pause", key)], args=[max(1, int(seconds * 1000)), reason or "-"]
        )

    @_translated
    async def paused_why(self, key: str) -> tuple[float, str]:
        k = self._key("pause", key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.pttl(k)
            pipe.get(k)
            ms, reason = await pipe.execute()
        if int(ms) <= 0:
            return 0.0, ""
        text = reason.decode() if isinstance(reason, bytes) else str(reason or "")
        return int(ms) / 1000.0, "" if text in ("-", "1") else text

    @_translated
    async def close(self) -> None:
        await self.redis.aclose()
