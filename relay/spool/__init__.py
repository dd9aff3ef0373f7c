"""The spool: durable store of accepted messages and their per-recipient state.

SQLite in WAL mode with synchronous=FULL; one writer thread batches every queued write into
one transaction and one commit (group commit), so `await spool.put(...)` returning means the
message, its body and its recipients are fsynced, and concurrent DATA replies share one
fsync. Bodies are BLOBs in the same database (one commit covers metadata and body).

Chosen by benchmark (`python benchmarks/spool_bench.py --scale 200000`; shared 2-core VM,
ext4 on virtio, 5,000 puts of 5,000 bytes; two runs, ranges shown):

    variant                         puts/s      commits/s   batch   p50 / p99 latency
    SQLite WAL, 50 putters          7,200-11,100  290-435    ~25    4-6 / 12-18 ms
    files+fsync+rename, 50 putters    870-2,200    22-72    30-40  23-55 / 38-111 ms
    SQLite WAL, 1 putter            1,800-2,100  = puts/s     1    0.4-0.5 ms
    files+fsync+rename, 1 putter    1,250-1,560  = puts/s     1    0.6-0.7 ms

The file variant was given the same writer thread and batching (one directory fsync per
batch) yet still pays one fsync per message; SQLite pays one per batch. At 200,000 queued
messages (two recipients each): summary() 83-132 ms, list(org=…) 30-35 ms, and
iter_pending() 2.3 s with max RSS flat at 64 MiB (it pages 1,000 rows per query).

Crash semantics: an acknowledged put survives SIGKILL and power loss (WAL fsynced at
COMMIT). An update that was not yet committed is lost on a crash, which can only cause a
recipient to be delivered again (a duplicate), never a message to be lost.
"""

from relay.spool.eventlog import EventLog, StoredEvent
from relay.spool.queue_id import is_queue_id, new_queue_id
from relay.spool.store import Spool
from relay.spool.types import EventRow, RcptStatus, RecipientUpdate, SpoolMessage, SpoolRecipient
from relay.spool.writer import WriterStats

__all__ = [
    "EventLog",
    "EventRow",
    "RcptStatus",
    "RecipientUpdate",
    "Spool",
    "SpoolMessage",
    "SpoolRecipient",
    "StoredEvent",
    "WriterStats",
    "is_queue_id",
    "new_queue_id",
]
