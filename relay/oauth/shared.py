"""Where processes share an access token and take turns refreshing it.

- `FileShare`: the workers of one machine (`workers: N`) share one directory under the spool
  (`spool/oauth/`): one file per token (mode 0600, replaced atomically) and one `flock`ed
  lock file per token, held while that process asks the identity provider. The others
  wait on the lock, then find the new token in the file.
- `RedisShare`: several nodes (the Redis limits backend) share the token under
  `relay:oauth:KEY` (expiring with the token) and take turns with `SET NX PX` on
  `relay:oauth:KEY:lock`; a node that does not get the lock polls for the token (bounded).
  Rotated refresh tokens are kept there too (`relay:oauth:KEY:refresh`) so any node can
  refresh; the spool's file keeps them as well.

Both give `turn(key)`: an async context that holds the exclusive right to refresh `key`,
and `load`/`save` of the current token. Any trouble with the share (a full disk, Redis
down) falls back to this process alone: a token is still obtained, only not shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from relay.core import redisclient

log = logging.getLogger("relay.oauth")

LOCK_WAIT = 45.0  # longest wait for another process's refresh (a token request is ≤ 30 s)
POLL = 0.05


class Share(Protocol):
    def turn(self, key: str) -> contextlib.AbstractAsyncContextManager[None]: ...
    async def load(self, key: str) -> dict[str, Any] | None: ...
    async def save(self, key: str, token: dict[str, Any]) -> None: ...
    async def load_refresh(self, key: str) -> dict[str, Any] | None: ...
    async def save_refresh(self, key: str, record: dict[str, Any]) -> None: ...
    async def close(self) -> None: ...


def _write_private(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class FileShare:
    """Tokens and refresh tokens in `directory` (created 0700), for the processes of a machine."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def _ensure(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        fd: int | None = None
        try:
            await asyncio.to_thread(self._ensure)
            fd = os.open(self.dir / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        log.warning("oauth: waited %.0fs for another process's token refresh;"
                                    " refreshing here", LOCK_WAIT)
                        break
                    await asyncio.sleep(POLL)
        except OSError as exc:
            log.warning("oauth: cannot share tokens under %s (%s); this process refreshes alone",
                        self.dir, exc.strerror or exc)
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    async def load(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(_read, self.dir / f"{key}.token")

    async def save(self, key: str, token: dict[str, Any]) -> None:
        await self._save(self.dir / f"{key}.token", token)

    async def load_refresh(self, key: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(_read, self.dir / f"{key}.refresh")

    async def save_refresh(self, key: str, record: dict[str, Any]) -> None:
        await self._save(self.dir / f"{key}.refresh", record)

    async def _save(self, path: Path, data: dict[str, Any]) -> None:
        try:
            await asyncio.to_thread(self._ensure)
            await asyncio.to_thread(_write_private, path, data)
        except OSError as exc:
            log.warning("oauth: cannot write %s: %s", path.name, exc.strerror or exc)

    async def close(self) -> None:
        return None


class RedisShare:
    """Tokens shared between nodes through Redis; refresh tokens also kept in `files`."""

    def __init__(self, url: str, files: FileShare, *, timeout: float = 0.5) -> None:
        self._redis = redisclient.client(url, timeout)
        self._files = files
        self._node = uuid.uuid4().hex

    @staticmethod
    def _k(key: str, suffix: str = "") -> str:
        return f"relay:oauth:{key}{suffix}"

    @contextlib.asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        lock = self._k(key, ":lock")
        held = False
        deadline = time.monotonic() + LOCK_WAIT
        try:
            while time.monotonic() < deadline:
                if await self._redis.set(lock, self._node, nx=True, px=int(LOCK_WAIT * 1000)):
                    held = True
                    break
                await asyncio.sleep(POLL * 2)
        except Exception as exc:  # redis errors: share nothing, refresh alone
            log.warning("oauth: Redis unavailable for token sharing (%s); refreshing alone", exc)
        async with self._files.turn(key):  # the workers of this machine still take turns
            try:
                yield
            finally:
                if held:
                    with contextlib.suppress(Exception):
                        if await self._redis.get(lock) == self._node.encode():
                            await self._redis.delete(lock)

    async def load(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.get(self._k(key))
        except Exception:
            return await self._files.load(key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    async def save(self, key: str, token: dict[str, Any]) -> None:
        ttl = int((float(token["expires_at"]) - time.time()) * 1000)
        if ttl > 0:
            try:
                await self._redis.set(self._k(key), json.dumps(token), px=ttl)
            except Exception as exc:
                log.warning("oauth: cannot share the token through Redis: %s", exc)
        await self._files.save(key, token)

    async def load_refresh(self, key: str) -> dict[str, Any] | None:
        try:
            raw = await self._redis.get(self._k(key, ":refresh"))
            if raw is not None:
                data = json.loads(raw)
                if isinstance(data, dict):
                    return data
        except Exception:
            pass
        return await self._files.load_refresh(key)

    async def save_refresh(self, key: str, record: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self._redis.set(self._k(key, ":refresh"), json.dumps(record))
        await self._files.save_refresh(key, record)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._redis.aclose()
