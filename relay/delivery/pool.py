"""The idle-connection pool: which open sessions may be reused, and closing the rest.

Sessions are keyed by `Upstream.pool_key + (source address,)`, so a connection that logged
in as one customer is never handed to another. The pool only holds *idle* sessions: a
session in use belongs to its delivery. Idle sessions expire after `idle_timeout`; at most
`max_idle_per_key` are kept per key; retired sessions get a polite, time-bounded QUIT.
"""

from __future__ import annotations

import asyncio

from relay.delivery.connection import PoolKey, Session


class Pool:
    def __init__(
        self, *, idle_timeout: float, max_idle_per_key: int, quit_timeout: float = 5.0
    ) -> None:
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_key
        self._quit_timeout = quit_timeout
        self._idle: dict[PoolKey, list[Session]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def checkout(self, key: PoolKey) -> Session | None:
        """The most recently used live idle session for `key`, now owned by the caller."""
        idle = self._idle.get(key)
        while idle:
            session = idle.pop()
            self._cancel_timer(session)
            if session.alive:
                if not idle:
                    del self._idle[key]
                return session
            session.channel.close()  # the server hung up while it sat idle
        self._idle.pop(key, None)
        return None

    def checkin(
        self, session: Session, *, max_messages: int | None, max_idle: int | None = None
    ) -> None:
        """Return a session after a delivery: keep it idle, or retire it. `max_idle`
        overrides the pool-wide cap for this key (the upstream's own concurrency)."""
        if (
            self._closed
            or not session.alive
            or (max_messages is not None and session.messages >= max_messages)
            or len(self._idle.get(session.key, ())) >= (max_idle or self._max_idle)
        ):
            self.retire(session)
            return
        loop = asyncio.get_running_loop()
        session.idle_handle = loop.call_later(self._idle_timeout, self._expire, session)
        self._idle.setdefault(session.key, []).append(session)

    def retire(self, session: Session) -> None:
        """Close a session we are done with: QUIT if it is still up, in the background."""
        self._cancel_timer(session)
        if not session.alive:
            session.channel.close()
            return
        task = asyncio.get_running_loop().create_task(self._quit(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close_now(self, session: Session) -> None:
        """Close a session we are done with and wait for it (QUIT, bounded by quit_timeout)."""
        self._cancel_timer(session)
        if session.alive:
            await self._quit(session)
        else:
            session.channel.close()

    def take_idle(self, prefix: tuple[str, int, str, str], *, keep: int) -> list[Session]:
        """Idle sessions whose key starts with `prefix` (one upstream, every egress source)
        beyond the `keep` most recently used, now owned by the caller to close."""
        mine = [(k, s) for k, lst in self._idle.items() if k[:4] == prefix for s in lst]
        if len(mine) <= keep:
            return []
        mine.sort(key=lambda ks: ks[1].idle_handle.when() if ks[1].idle_handle else 0.0)
        out = []
        for k, session in mine[: len(mine) - max(0, keep)]:
            self._idle[k].remove(session)
            if not self._idle[k]:
                del self._idle[k]
            self._cancel_timer(session)
            out.append(session)
        return out

    def idle_for(self, prefix: tuple[str, int, str, str]) -> int:
        """Idle sessions of one upstream (its pool key), over every egress source."""
        return sum(len(lst) for k, lst in self._idle.items() if k[:4] == prefix)

    def idle_count(self, key: PoolKey | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """Retire every idle session and wait (bounded by quit_timeout) for the QUITs."""
        self._closed = True
        for sessions in list(self._idle.values()):
            for session in sessions:
                self.retire(session)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _expire(self, session: Session) -> None:
        idle = self._idle.get(session.key)
        session.idle_handle = None
        if idle is not None and session in idle:
            idle.remove(session)
            if not idle:
                del self._idle[session.key]
        self.retire(session)

    @staticmethod
    def _cancel_timer(session: Session) -> None:
        if session.idle_handle is not None:
            session.idle_handle.cancel()
            session.idle_handle = None

    async def _quit(self, session: Session) -> None:
        # RFC 5321 § 4.1.1.10: QUIT and wait for 221; a server that does not answer in
        # time just gets the connection closed.
        await session.channel.quit(self._quit_timeout)
