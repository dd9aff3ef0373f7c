"""Redis clients that fail fast, with redis-py (~70 ms to import) loaded only when the first
one is made: a relay without Redis, and every CLI command, never import it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis


def client(url: str, timeout: float) -> Redis:
    """A client with short socket timeouts, no retries and no health checks: a dead Redis is
    noticed within `timeout`, and the caller falls back."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def redis_error() -> type[Exception]:
    """redis-py's RedisError: what an unreachable or failing Redis raises (it wraps socket
    errors and timeouts in its own classes)."""
    from redis.exceptions import RedisError

    return RedisError
