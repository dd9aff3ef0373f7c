"""Suppression lists: per organisation (opt-in), recipients whose mail is refused at RCPT.

An organisation with `suppression: {enabled: true, classes: [hard], duration: 30d}` gets a
recipient added when a delivery to it fails with one of those classes; an operator adds and
removes entries by hand (`relay suppression`, the admin API). Later mail from that
organisation to the recipient is refused at RCPT with `550 5.1.1` naming when and why.

The RCPT check is synchronous and in memory (`lookup`). Behind it:
- a SQLite file `suppression.db` in the spool's root directory, shared by the worker
  processes of one node; every change gets a `seq`, and each process picks up the others'
  changes by polling `seq` every `POLL` seconds (removals are kept as tombstones);
- with the Redis limits backend, also Redis, shared by every node: a hash of the entries
  and a stream of changes that each process tails (`POLL` seconds). At start a reachable
  Redis is the list; an unreachable one leaves the node on its local copy (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.core import redisclient
from relay.core.model import Reply
from relay.core.redact import redact
from relay.core.sqlitefile import open_shared

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("relay.suppression")

DB_NAME = "suppression.db"
POLL = 1.0  # seconds between looks at the other processes' / nodes' changes
REDIS_HASH = "relay:suppression"
REDIS_STREAM = "relay:suppression:changes"
STREAM_MAXLEN = 100_000
MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Suppression:
    org: str
    recipient: str  # lower-case
    reason: str  # e.g. 'hard bounce: 550 5.1.1 No such user', or the operator's words
    klass: str  # failure class, or "manual"
    created_at: float
    expires_at: float | None  # None: until removed
    source: str  # the queue id whose failure added it, or "operator"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("klass")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suppression:
        return cls(str(d["org"]), str(d["recipient"]).lower(), str(d.get("reason", "")),
                   str(d.get("class", "manual")), float(d["created_at"]),
                   None if d.get("expires_at") is None else float(d["expires_at"]),
                   str(d.get("source", "operator")))

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    def refusal(self) -> str:
        """The RCPT reply text after '550 5.1.1 ' (one line, bounded)."""
        until = f", until {_iso(self.expires_at)}" if self.expires_at else ""
        return (f"<{self.recipient}> is suppressed for organisation {self.org} since"
                f" {_iso(self.created_at)}{until}: {self.reason}")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(org: str, recipient: str) -> str:
    return f"{org}\x00{recipient.lower()}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def clean_reason(text: str) -> str:
    text = " ".join(redact(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


_DDL = """
CREATE TABLE IF NOT EXISTS suppressions (
    org        TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    data       TEXT,             -- the entry as JSON; NULL: removed (a tombstone)
    seq        INTEGER NOT NULL,
    PRIMARY KEY (org, recipient)
);
CREATE INDEX IF NOT EXISTS suppressions_seq ON suppressions (seq)
"""


class _Local:
    """The node's SQLite copy (shared by its workers)."""

    def __init__(self, path: Path) -> None:
        self.conn = open_shared(path, _DDL)
        self.conn.execute("PRAGMA synchronous=FULL")
        self.lock = asyncio.Lock()

    def _put(self, org: str, recipient: str, data: str | None) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            seq = c.execute("SELECT coalesce(max(seq), 0) + 1 FROM suppressions").fetchone()[0]
            c.execute("INSERT INTO suppressions (org, recipient, data, seq) VALUES (?,?,?,?)"
                      " ON CONFLICT (org, recipient) DO UPDATE SET data = excluded.data,"
                      " seq = excluded.seq", (org, recipient, data, seq))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    async def put(self, org: str, recipient: str, data: str | None) -> None:
        async with self.lock:
            await asyncio.to_thread(self._put, org, recipient, data)

    def _since(self, seq: int) -> tuple[list[tuple[str, str, str | None]], int]:
        rows = self.conn.execute(
            "SELECT org, recipient, data, seq FROM suppressions WHERE seq > ? ORDER BY seq",
            (seq,)).fetchall()
        last = max((int(r[3]) for r in rows), default=seq)
        return [(str(o), str(r), d) for o, r, d, _ in rows], last

    async def since(self, seq: int) -> tuple[list[tuple[str, str, str | None]], int]:
        async with self.lock:
            return await asyncio.to_thread(self._since, seq)

    def close(self) -> None:
        self.conn.close()


class SuppressionList:
    """The in-memory index every RCPT consults, kept in step with its stores."""

    def __init__(self, directory: Path, *, redis_url: str | None = None,
                 redis_timeout: float = 0.5, clock: Callable[[], float] = time.time) -> None:
        self._local = _Local(directory / DB_NAME)
        self._redis: Redis | None = None
        # What a failing Redis raises (OSError alone while there is none: redis-py is
        # imported only with the first client).
        self._redis_errors: tuple[type[Exception], ...] = (OSError,)
        if redis_url:
            self._redis = redisclient.client(redis_url, redis_timeout)
            self._redis_errors = (redisclient.redis_error(), OSError)
        self._clock = clock
        self._index: dict[str, Suppression] = {}
        self._local_seq = 0
        self._stream_id = "0-0"
        self._redis_loaded = False
        self._task: asyncio.Task[None] | None = None

    # -- lookups (synchronous, memory) ----------------------------------------------------
    @property
    def entries_exist(self) -> bool:
        """False when no organisation has any entry (the RCPT check is then free)."""
        return bool(self._index)

    def lookup(self, org: str, recipient: str) -> Suppression | None:
        s = self._index.get(_key(org, recipient))
        return s if s is not None and s.active(self._clock()) else None

    def entries(self, org: str | None = None) -> list[Suppression]:
        now = self._clock()
        out = [s for s in self._index.values() if s.active(now) and (org is None or s.org == org)]
        return sorted(out, key=lambda s: (s.org, s.created_at, s.recipient))

    # -- changes ------------------------------------------------------------------------
    async def add(self, s: Suppression) -> None:
        s = Suppression(s.org, s.recipient.lower(), clean_reason(s.reason), s.klass,
                        s.created_at, s.expires_at, s.source)
        data = json.dumps(s.as_dict(), separators=(",", ":"))
        self._index[_key(s.org, s.recipient)] = s
        await self._local.put(s.org, s.recipient, data)
        await self._publish(s.org, s.recipient, data)

    async def remove(self, org: str, recipient: str) -> bool:
        key = _key(org, recipient)
        known = self.lookup(org, recipient) is not None
        self._index.pop(key, None)
        await self._local.put(org, recipient.lower(), None)
        await self._publish(org, recipient.lower(), None)
        return known

    async def _publish(self, org: str, recipient: str, data: str | None) -> None:
        if self._redis is None:
            return
        key = _key(org, recipient)
        try:
            async with self._redis.pipeline(transaction=True) as p:
                if data is None:
                    p.hdel(REDIS_HASH, key)
                else:
                    p.hset(REDIS_HASH, key, data)
                p.xadd(REDIS_STREAM, {"k": key, "v": data or ""}, maxlen=STREAM_MAXLEN,
                       approximate=True)
                await p.execute()
        except self._redis_errors as exc:
            log.warning("suppression of %s for %s kept on this node only: Redis: %s",
                        recipient, org, exc)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        rows, self._local_seq = await self._local.since(0)
        self._apply_local(rows)
        await self._load_redis()
        self._task = asyncio.create_task(self._follow(), name="suppression-follow")

    async def _load_redis(self) -> None:
        if self._redis is None or self._redis_loaded:
            return
        try:
            last = await self._redis.xrevrange(REDIS_STREAM, count=1)
            entries = await self._redis.hgetall(REDIS_HASH)
        except self._redis_errors as exc:
            log.warning("suppression list: Redis unreachable (%s); using this node's copy", exc)
            return
        self._stream_id = _text(last[0][0]) if last else "0-0"
        index: dict[str, Suppression] = {}
        for raw in entries.values():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                s = Suppression.from_dict(json.loads(raw))
                index[_key(s.org, s.recipient)] = s
        self._index = index
        self._redis_loaded = True

    def _apply_local(self, rows: Iterable[tuple[str, str, str | None]]) -> None:
        for org, rcpt, data in rows:
            self._apply(_key(org, rcpt), data)

    def _apply(self, key: str, data: str | None) -> None:
        if not data:
            self._index.pop(key, None)
            return
        try:
            self._index[key] = Suppression.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError):
            log.warning("suppression list: ignoring a damaged entry")

    async def refresh(self) -> None:
        """Take in the changes other processes and nodes made since the last look."""
        rows, self._local_seq = await self._local.since(self._local_seq)
        self._apply_local(rows)
        if self._redis is None:
            return
        if not self._redis_loaded:
            await self._load_redis()
            return
        try:
            got = await self._redis.xread({REDIS_STREAM: self._stream_id}, count=10_000)
        except self._redis_errors:
            return
        streams: list[Any] = list(got or [])
        for _, items in streams:
            for sid, fields in items:
                self._stream_id = _text(sid)
                key = _text(fields.get(b"k", b""))
                value = _text(fields.get(b"v", b""))
                self._apply(key, value or None)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            try:
                await self.refresh()
            except Exception:
                log.exception("suppression list: refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._redis is not None:
            await self._redis.aclose()
        self._local.close()


class AutoSuppressor:
    """relay.scheduler.outcomes.Suppressor: adds failed recipients to their organisation's
    list when its `suppression` settings ask for that failure class."""

    def __init__(self, lst: SuppressionList, settings: Callable[[str], Any],
                 clock: Callable[[], float] = time.time) -> None:
        self.list = lst
        self.settings = settings  # org -> its SuppressionConf (or None)
        self.clock = clock

    async def failed(self, org: str, recipient: str, klass: str, reply: Reply,
                     queue_id: str) -> None:
        conf = self.settings(org)
        if conf is None or not conf.enabled or klass not in conf.classes:
            return
        now = self.clock()
        await self.list.add(Suppression(
            org=org, recipient=recipient, reason=f"{klass} bounce: {reply}", klass=klass,
            created_at=now, expires_at=now + conf.duration if conf.duration else None,
            source=queue_id))
        log.info("suppressed %s for organisation %s (%s bounce of %s)", recipient, org, klass,
                 queue_id)
