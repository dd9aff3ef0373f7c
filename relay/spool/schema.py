"""The spool's SQLite schema, connection settings, and the row <-> SpoolMessage codec."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay.core import jsonline
from relay.spool.types import RcptStatus, SpoolMessage, SpoolRecipient

DB_NAME = "spool.db"
SCHEMA_VERSION = 2

# messages holds metadata only; `pending` (count of PENDING recipients) is kept so summaries
# never parse recipient lists. Recipients are one JSON array per message: a message is read
# and rewritten as a whole by every update, and recovery reads one row per message.
# Bodies live in their own table keyed by the same rowid, so scans of `messages` (summary,
# list, recovery) never page through message bodies.
# `due` is when the scheduler should next look at the message: the earliest next_attempt of
# its pending recipients (0 = now), or later while its upstream is paused, or `now` after an
# operator's retry/release. The scheduler keeps only a bounded set of messages in memory and
# finds the others through the (held, due, queue_id) index, in due order (schema version 2).
DDL = """
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    queue_id    TEXT    NOT NULL UNIQUE,
    received_at REAL    NOT NULL,
    sender      TEXT    NOT NULL,
    client      TEXT    NOT NULL,
    org         TEXT    NOT NULL,
    account     TEXT    NOT NULL,
    upstream    TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    held        INTEGER NOT NULL DEFAULT 0,
    is_dsn      INTEGER NOT NULL DEFAULT 0,
    pending     INTEGER NOT NULL,
    recipients  TEXT    NOT NULL,
    due         REAL    NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS bodies (
    id   INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
-- Covering indexes: summary() groups by upstream / org reading only the index.
CREATE INDEX IF NOT EXISTS messages_upstream ON messages (upstream, received_at, pending, held);
CREATE INDEX IF NOT EXISTS messages_org ON messages (org, received_at, pending, held);
CREATE INDEX IF NOT EXISTS messages_account ON messages (account, received_at);
CREATE INDEX IF NOT EXISTS messages_received ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_due ON messages (held, due, queue_id);
-- Rows that failed to decode at recovery, moved aside verbatim (no types or constraints),
-- so an operator can inspect or repair them; they are never delivered automatically.
CREATE TABLE IF NOT EXISTS quarantine (
    qid         INTEGER PRIMARY KEY,
    moved_at    REAL,
    reason      TEXT,
    id, queue_id, received_at, sender, client, org, account, upstream, size, held, is_dsn,
    pending, recipients, body
);
"""

MESSAGE_COLUMNS = (
    "queue_id, received_at, sender, client, org, account, upstream, size, held, is_dsn, recipients,"
    " dsn"
)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the spool's settings. Autocommit mode: transactions are explicit."""
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,  # callers serialise use of a connection themselves
        timeout=10.0,  # busy timeout; WAL readers never block the writer, only checkpoints
    )
    # synchronous=FULL in WAL mode fsyncs the WAL at every COMMIT: a returned COMMIT is on
    # disk. NORMAL would only sync at checkpoints and could lose acknowledged mail.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA cache_size=-16384")  # 16 MiB
    # Statement and SAVEPOINT sub-journals (the pages a statement or an operation changes,
    # kept to undo it alone) spilled past 64 KiB to a temporary file: ~37 pwrite calls per
    # message when the writer gave every operation a SAVEPOINT. In memory they hold at most
    # a batch of operations' pages (writer.MAX_BATCH_OPS), freed at COMMIT; durability is
    # the WAL's, not theirs.
    conn.execute("PRAGMA temp_store=MEMORY")
    if readonly:
        conn.execute("PRAGMA query_only=ON")
    return conn


def init_schema(conn: sqlite3.Connection) -> None:
    """Create or check the schema; raises sqlite3.DatabaseError on a file that is not a DB."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError(f"cannot switch spool to WAL mode (got {mode!r})")
    # Keep the WAL from staying huge after a burst: truncate it to 64 MiB at checkpoints.
    conn.execute("PRAGMA journal_size_limit=67108864")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, 1, SCHEMA_VERSION):
        raise sqlite3.DatabaseError(f"spool schema version {version} is not supported")
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version == 1:  # before `due`: computed from the recipients (one pass, at upgrade)
            conn.execute("ALTER TABLE messages ADD COLUMN due REAL NOT NULL DEFAULT 0")
            conn.execute(
                "UPDATE messages SET due = coalesce((SELECT min(json_extract(value, '$[3]'))"
                " FROM json_each(recipients) WHERE json_extract(value, '$[1]') = 'pending'), 0)"
                " WHERE json_valid(recipients)"
            )
        _run(conn, DDL)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        _apply_steps(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


# Schema changes after version 2 are named steps, applied once each, in this order, in the
# same transaction as the rest of init_schema; `schema_steps` records which ran. A feature
# that needs a table or a column appends its own step here (never edit or reorder a step that
# has shipped): steps from independent features then never collide on a version number.
Step = tuple[str, "str | Callable[[sqlite3.Connection], None]"]
STEPS: list[Step] = [
    # RFC 3461 parameters (RET, ENVID, NOTIFY, ORCPT) as relay.core.dsn's JSON; NULL: none.
    ("dsn-parameters", "ALTER TABLE messages ADD COLUMN dsn TEXT"),
]

# Events (relay/notify): every disposition and operator action, written in the same
# transaction as the state change it reports; the trace and the webhook outboxes read them.
# `seq` orders one shard's events (AUTOINCREMENT: never reused, even after pruning, so a
# receiver checks for gaps by it); `webhook_cursors` holds each endpoint's last acknowledged
# seq (its outbox is every later event it subscribes to). Independent of `bodies`.
STEPS.append((
    "events-1",
    """
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    id         TEXT    NOT NULL UNIQUE,
    ts         REAL    NOT NULL,
    type       TEXT    NOT NULL,
    queue_id   TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    org        TEXT    NOT NULL,
    recipient  TEXT    NOT NULL,
    data       TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_queue ON events (queue_id);
CREATE INDEX IF NOT EXISTS events_message ON events (message_id) WHERE message_id != '';
CREATE INDEX IF NOT EXISTS events_recipient ON events (recipient) WHERE recipient != '';
CREATE TABLE IF NOT EXISTS webhook_cursors (
    endpoint   TEXT PRIMARY KEY,
    acked      INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
""",
))


def _run(conn: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";\n"):
        if statement.strip():
            conn.execute(statement)


def _apply_steps(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_steps (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT name FROM schema_steps")}
    for name, step in STEPS:
        if name in done:
            continue
        if isinstance(step, str):
            _run(conn, step)
        else:
            step(conn)
        conn.execute(
            "INSERT INTO schema_steps (name, applied_at) VALUES (?, julianday('now'))", (name,)
        )


class DamagedRow(ValueError):
    """A stored row whose columns do not decode into a SpoolMessage."""


def encode_recipients(recipients: Sequence[SpoolRecipient]) -> str:
    """Compact JSON (orjson: written twice per message, at put and at the outcome)."""
    return jsonline.dumps(
        [[r.rcpt, r.status.value, r.attempts, r.next_attempt, r.last_reply] for r in recipients]
    )


def due_of(recipients: Sequence[SpoolRecipient]) -> float:
    """The `due` column for these recipients: their earliest pending next_attempt (0 = now)."""
    return min((r.next_attempt for r in recipients if r.status is RcptStatus.PENDING), default=0.0)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise DamagedRow(f"{name} is {type(value).__name__}, not text")
    return value


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DamagedRow(f"{name} is {type(value).__name__}, not a number")
    return float(value)


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DamagedRow(f"{name} is {type(value).__name__}, not an integer")
    return value


def decode_recipients(raw: Any) -> list[SpoolRecipient]:
    text = _text(raw, "recipients")
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise DamagedRow(f"recipients are not JSON: {exc}") from None
    if not isinstance(items, list) or not items:
        raise DamagedRow("recipients are not a non-empty list")
    out = []
    for item in items:
        if not isinstance(item, list) or len(item) != 5:
            raise DamagedRow("a recipient entry has the wrong shape")
        rcpt, status, attempts, next_attempt, last_reply = item
        try:
            parsed = RcptStatus(status)
        except ValueError:
            raise DamagedRow(f"unknown recipient status {status!r}") from None
        out.append(
            SpoolRecipient(
                rcpt=_text(rcpt, "rcpt"),
                status=parsed,
                attempts=_integer(attempts, "attempts"),
                next_attempt=number(next_attempt, "next_attempt"),
                last_reply=_text(last_reply, "last_reply"),
            )
        )
    return out


def decode_message(row: Sequence[Any]) -> SpoolMessage:
    """A row of MESSAGE_COLUMNS → SpoolMessage; DamagedRow when any column is not what we wrote."""
    if len(row) != 12:
        raise DamagedRow("row has the wrong number of columns")
    queue_id, received_at, sender, client, org, account, upstream, size, held, is_dsn, rcpts, dsn = (
        row
    )
    if dsn is not None and not isinstance(dsn, str):
        raise DamagedRow(f"dsn is {type(dsn).__name__}, not text")
    return SpoolMessage(
        queue_id=_text(queue_id, "queue_id"),
        received_at=number(received_at, "received_at"),
        sender=_text(sender, "sender"),
        client=_text(client, "client"),
        org=_text(org, "org"),
        account=_text(account, "account"),
        upstream=_text(upstream, "upstream"),
        size=_integer(size, "size"),
        held=bool(_integer(held, "held")),
        is_dsn=bool(_integer(is_dsn, "is_dsn")),
        recipients=decode_recipients(rcpts),
        dsn=dsn,
    )


# Bodies in segment files (relay/spool/segments.py): a row says where its body is
# (`body_seg`, `body_off`; its length is `size`); NULL `body_seg`: the body is a BLOB in
# `bodies`, as every body was before this step (such rows are still read and delivered).
# `wire` = 1: the body is exactly what goes on the wire before the final "." (CRLF lines,
# none starting with "."), so delivery sends it without another scan. The index finds the
# rows of a segment (is it empty? which rows lost their body?) without touching the table.
STEPS.append((
    "body-segments",
    """
ALTER TABLE messages ADD COLUMN body_seg INTEGER;
ALTER TABLE messages ADD COLUMN body_off INTEGER;
ALTER TABLE messages ADD COLUMN wire INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS messages_body ON messages (body_seg, body_off, size)
    WHERE body_seg IS NOT NULL
""",
))

# Queued messages, pending recipients and held messages per upstream and per organisation,
# kept by triggers as rows change, so that a summary reads a few rows instead of scanning two
# indexes (~0.3 s at a million queued messages; RESULTS.md §12). Every change to `messages`
# goes through SQL, so the triggers see all of them (puts, outcomes, holds, re-routing,
# deletes, quarantine, shard folding). Rows at 0 stay (one per name ever seen: few).
_COUNT_KINDS = ("upstream", "org")


def _add(kind: str, row: str, sign: str) -> str:
    return (
        f"INSERT INTO queue_counts (kind, name, messages, pending, held) VALUES ('{kind}',"
        f" {row}.{kind}, {sign}1, {sign}{row}.pending, {sign}{row}.held) ON CONFLICT (kind, name)"
        " DO UPDATE SET messages = messages + excluded.messages,"
        " pending = pending + excluded.pending, held = held + excluded.held;"
    )


def _queue_counts(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS queue_counts (kind TEXT NOT NULL, name TEXT NOT NULL,"
        " messages INTEGER NOT NULL, pending INTEGER NOT NULL, held INTEGER NOT NULL,"
        " PRIMARY KEY (kind, name)) WITHOUT ROWID"
    )
    conn.execute("DELETE FROM queue_counts")
    for kind in _COUNT_KINDS:
        conn.execute(
            "INSERT INTO queue_counts (kind, name, messages, pending, held)"
            f" SELECT '{kind}', {kind}, count(*), total(pending), total(held) FROM messages"
            f" GROUP BY {kind}"
        )
    adds_new = " ".join(_add(k, "NEW", "+") for k in _COUNT_KINDS)
    subs_old = " ".join(_add(k, "OLD", "-") for k in _COUNT_KINDS)
    conn.execute(
        f"CREATE TRIGGER IF NOT EXISTS queue_counts_insert AFTER INSERT ON messages BEGIN"
        f" {adds_new} END"
    )
    conn.execute(
        f"CREATE TRIGGER IF NOT EXISTS queue_counts_delete AFTER DELETE ON messages BEGIN"
        f" {subs_old} END"
    )
    conn.execute(
        "CREATE TRIGGER IF NOT EXISTS queue_counts_update AFTER UPDATE OF upstream, org,"
        " pending, held ON messages WHEN OLD.upstream IS NOT NEW.upstream OR OLD.org IS NOT"
        " NEW.org OR OLD.pending IS NOT NEW.pending OR OLD.held IS NOT NEW.held"
        f" BEGIN {subs_old} {adds_new} END"
    )


STEPS.append(("queue-counts", _queue_counts))
