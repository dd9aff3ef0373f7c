"""Opening an SQLite file that several worker processes open at the same moment."""

from __future__ import annotations

import fcntl
import sqlite3
from pathlib import Path


def open_shared(path: Path, ddl: str, *, timeout: float = 10.0) -> sqlite3.Connection:
    """Open `path` in WAL mode with `ddl` applied, safe against other processes doing the same.

    Switching a new database to WAL needs it alone, and SQLite answers "database is locked"
    at once instead of waiting (the busy timeout does not cover it): two workers starting on a
    fresh spool failed that way. The switch and the DDL therefore run under an exclusive
    lock on a file beside the database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    with open(path.with_name(path.name + ".init-lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(ddl)
    return conn
