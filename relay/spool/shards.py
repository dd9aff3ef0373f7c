"""Spool shards: one spool directory per worker process, and folding surplus shards back.

With `workers: N`, worker 0 keeps the configured spool directory itself (so one worker is
exactly the single-process layout) and worker i > 0 uses its sub-directory `w<i>`. Each
shard is an ordinary spool with its own lock, written by one process only.

When N shrinks, shards `w<N>`, `w<N+1>`, … have no worker. Before any worker starts,
`fold_surplus` moves their messages (metadata, per-recipient state, bodies, quarantined rows)
into shard 0 in one SQLite transaction, then removes the emptied shard. The copy skips
queue ids shard 0 already has, so a crash between the commit and the removal only means the
next start finds nothing new to copy: nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from pathlib import Path

from relay.spool.schema import DB_NAME, connect, init_schema
from relay.spool.store import LOCK_NAME, lock_directory

log = logging.getLogger("relay.spool")

_SHARD = re.compile(r"^w([1-9][0-9]*)$")


def shard_path(root: Path, index: int) -> Path:
    """The spool directory of worker `index`."""
    return root if index == 0 else root / f"w{index}"


def surplus_shards(root: Path, count: int) -> list[Path]:
    """Shard directories under `root` that no worker of `count` owns, in index order."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _SHARD.match(child.name)
        if m and int(m.group(1)) >= count and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _columns(conn: sqlite3.Connection, schema: str, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA {schema}.table_info({table})")]


def merge_shard(src: Path, dst: Path) -> int:
    """Move every message of spool `src` into spool `dst` (both must be idle: their locks
    are taken here); returns how many messages were copied. `src` is removed afterwards."""
    src_lock = lock_directory(src)
    try:
        dst.mkdir(parents=True, exist_ok=True)
        dst_lock = lock_directory(dst)
        try:
            copied = _copy(src / DB_NAME, dst / DB_NAME) if (src / DB_NAME).exists() else 0
        finally:
            os.close(dst_lock)
    finally:
        os.close(src_lock)
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME):
        (src / name).unlink(missing_ok=True)
    try:
        src.rmdir()
    except OSError as exc:  # something else lives there: leave it, the messages are moved
        log.warning("spool shard %s emptied but not removed: %s", src, exc)
    return copied


def _copy(src_db: Path, dst_db: Path) -> int:
    for path in (src_db, dst_db):  # same schema version on both sides
        c = connect(path)
        try:
            init_schema(c)
        finally:
            c.close()
    conn = connect(dst_db)
    try:
        conn.execute("ATTACH DATABASE ? AS src", (str(src_db),))
        cols = [c for c in _columns(conn, "main", "messages") if c != "id"]
        qcols = [c for c in _columns(conn, "main", "quarantine") if c != "qid"]
        names, qnames = ", ".join(cols), ", ".join(qcols)
        conn.execute("BEGIN IMMEDIATE")
        try:
            offset = conn.execute("SELECT coalesce(max(id), 0) FROM main.messages").fetchone()[0]
            # Ids to move: those whose queue id shard 0 does not have yet (idempotent).
            conn.execute(
                "CREATE TEMP TABLE moving AS SELECT id FROM src.messages"
                " WHERE queue_id NOT IN (SELECT queue_id FROM main.messages)"
            )
            conn.execute(
                f"INSERT INTO main.messages (id, {names}) SELECT id + ?, {names}"
                " FROM src.messages WHERE id IN (SELECT id FROM temp.moving)",
                (offset,),
            )
            conn.execute(
                "INSERT INTO main.bodies (id, data) SELECT id + ?, data FROM src.bodies"
                " WHERE id IN (SELECT id FROM temp.moving)",
                (offset,),
            )
            conn.execute(
                f"INSERT INTO main.quarantine ({qnames}) SELECT {qnames} FROM src.quarantine"
            )
            # Events (traces, webhook outboxes): appended with shard 0's next seqs, so its
            # endpoints post them (again: receivers de-duplicate by event id).
            conn.execute(
                "INSERT INTO main.events (id, ts, type, queue_id, message_id, org, recipient,"
                " data) SELECT id, ts, type, queue_id, message_id, org, recipient, data"
                " FROM src.events WHERE id NOT IN (SELECT id FROM main.events) ORDER BY seq"
            )
            copied = int(conn.execute("SELECT count(*) FROM temp.moving").fetchone()[0])
            conn.execute("DROP TABLE temp.moving")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH DATABASE src")
    finally:
        conn.close()
    return copied


def fold_surplus(root: Path, count: int) -> int:
    """Fold every shard beyond `count` workers into shard 0; returns messages moved."""
    moved = 0
    for shard in surplus_shards(root, count):
        n = merge_shard(shard, root)
        log.info("spool shard %s has no worker now; moved its %d message(s) to %s", shard, n, root)
        moved += n
    return moved
