"""Spool shards: one spool directory per worker process, and folding surplus shards back.

With `workers: N`, worker 0 keeps the configured spool directory itself (so one worker is
exactly the single-process layout) and worker i > 0 uses its sub-directory `w<i>`. Each
shard is an ordinary spool with its own lock, written by one process only.

When N shrinks, shards `w<N>`, `w<N+1>`, … have no worker. Before any worker starts,
`fold_surplus` moves their messages (metadata, per-recipient state, bodies, quarantined rows)
into shard 0 in one SQLite transaction, then removes the emptied shard. Body segments are
hard-linked into shard 0 under new numbers *before* that commit (a crash before it leaves
only orphan segments, swept at the next open). The copy skips queue ids shard 0 already
has, so a crash between the commit and the removal only means the next start finds nothing
new to copy: nothing is lost or duplicated.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from pathlib import Path

from relay.spool.schema import DB_NAME, connect, init_schema
from relay.spool.segments import SEGMENT_DIR, Segments, fsync_dir, segment_name
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
    seg_dir = src / SEGMENT_DIR
    if seg_dir.is_dir():
        for path in Segments(src).files().values():
            path.unlink()
        try:
            seg_dir.rmdir()
        except OSError as exc:
            log.warning("spool shard %s: %s not removed: %s", src, seg_dir, exc)
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
        segmap = _link_segments(conn, src_db.parent, dst_db.parent)
        conn.execute("CREATE TEMP TABLE segmap (old INTEGER PRIMARY KEY, new INTEGER)")
        conn.executemany("INSERT INTO temp.segmap VALUES (?, ?)", segmap.items())
        cols = [c for c in _columns(conn, "main", "messages") if c not in ("id", "body_seg")]
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
                f"INSERT INTO main.messages (id, body_seg, {names}) SELECT id + ?,"
                f" (SELECT new FROM temp.segmap WHERE old = body_seg), {names}"
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
            conn.execute("DROP TABLE temp.segmap")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("DETACH DATABASE src")
    finally:
        conn.close()
    return copied


def _link_segments(conn: sqlite3.Connection, src: Path, dst: Path) -> dict[int, int]:
    """Hard-link every body segment the source's messages use into the destination under
    a number the destination does not use; old number -> new number. Durable (directory
    fsync) before the caller commits rows that point at them."""
    used = [
        int(r[0])
        for r in conn.execute("SELECT DISTINCT body_seg FROM src.messages WHERE body_seg IS NOT NULL")
    ]
    if not used:
        return {}
    target = Segments(dst)
    target.directory.mkdir(parents=True, exist_ok=True)
    (top,) = conn.execute("SELECT coalesce(max(body_seg), 0) FROM main.messages").fetchone()
    number = max([*target.files(), int(top)]) + 1
    source = Segments(src).files()
    mapping: dict[int, int] = {}
    for old in sorted(used):
        path = source.get(old)
        if path is not None:  # else a number with no file: shard 0 quarantines the rows
            os.link(path, target.directory / segment_name(number))
        mapping[old] = number
        number += 1
    fsync_dir(target.directory)
    return mapping


def fold_surplus(root: Path, count: int) -> int:
    """Fold every shard beyond `count` workers into shard 0; returns messages moved."""
    moved = 0
    for shard in surplus_shards(root, count):
        n = merge_shard(shard, root)
        log.info("spool shard %s has no worker now; moved its %d message(s) to %s", shard, n, root)
        moved += n
    return moved
