"""The spool: durable store of accepted messages and their per-recipient state.

SQLite in WAL mode with synchronous=FULL holds the metadata; one writer thread batches every
queued write into one transaction and one commit (group commit), so `await spool.put(...)`
returning means the message, its body and its recipients are fsynced, and concurrent DATA
replies share one fsync. Within a batch, consecutive puts and delivery outcomes run together
in a few statements (relay/spool/bulk.py), not a few each.

Bodies live in append-only segment files (`bodies/<n>.seg`, relay/spool/segments.py), not in
the database: the writer appends each body of a batch to the open segment, fdatasyncs it
once, then commits the batch's rows, which say where each body is. A body is written once
(SQLite writes a BLOB twice, to the WAL and again at the checkpoint, and frees its overflow
pages again when the message is deleted) and a delivered message's body costs nothing to
delete: its segment file is unlinked when the last body in it leaves. Rows of spools written
before segments keep their BLOBs in `bodies` and are read and delivered as before.

Chosen by benchmark (`python benchmarks/spool_bench.py --lifecycle --size N`: put, read back
from disk, delivered update, 50 at a time; shared 2-core VM, ext4 on virtio, load 1.6-2.8;
two alternations, ranges shown):

    body      BLOBs in SQLite               segment files
    5 KB      4,264-4,936 msg/s, 0.24-0.29  6,397-6,871 msg/s, 0.12-0.13 ms CPU/msg
    100 KB    1,034-1,147 msg/s, 0.61-0.65  3,327-3,585 msg/s, 0.21-0.23 ms CPU/msg
    1 MB        125-126 msg/s, 6.0-6.3      706-709 msg/s, 0.89-0.90 ms CPU/msg

Segments won at every size, small ones included despite the second fsync per batch (the
segment's, before the WAL's), so every body goes to a segment.

The original choice of SQLite over one file per message (`spool_bench.py`, 5,000 puts of
5,000 bytes, before segments):

    variant                         puts/s      commits/s   batch   p50 / p99 latency
    SQLite WAL, 50 putters          7,200-11,100  290-435    ~25    4-6 / 12-18 ms
    files+fsync+rename, 50 putters    870-2,200    22-72    30-40  23-55 / 38-111 ms

The file variant pays one fsync per message; SQLite (and the segments) one per batch. At
200,000 queued messages (two recipients each): summary() 83-132 ms, list(org=…) 30-35 ms,
and iter_pending() 2.3 s with max RSS flat at 64 MiB (it pages 1,000 rows per query).

Crash semantics: an acknowledged put survives SIGKILL and power loss (segment fdatasynced,
then the WAL fsynced at COMMIT). A crash can leave body bytes no committed row points at:
never read, and removed with their segment (segments are never appended to after a
restart); a segment no row refers to is removed at open, and a row whose body is missing or
cut short is quarantined at open rather than delivered. An update that was not yet
committed is lost on a crash, which can only cause a recipient to be delivered again (a
duplicate), never a message to be lost. Known limit: a segment (64 MiB) stays on disk while
any body in it is queued, so a few long-deferred messages can keep dead bytes around.
"""

from relay.spool.eventlog import EventLog, StoredEvent
from relay.spool.queue_id import is_queue_id, new_queue_id
from relay.spool.store import Spool
from relay.spool.types import (
    EventRow,
    RcptStatus,
    RecipientUpdate,
    SpoolMessage,
    SpoolRecipient,
    StoredBody,
)
from relay.spool.writer import WriterStats

__all__ = [
    "EventLog",
    "EventRow",
    "RcptStatus",
    "RecipientUpdate",
    "Spool",
    "SpoolMessage",
    "SpoolRecipient",
    "StoredBody",
    "StoredEvent",
    "WriterStats",
    "is_queue_id",
    "new_queue_id",
]
