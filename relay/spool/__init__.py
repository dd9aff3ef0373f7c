"""The spool: durable store of accepted messages and their per-recipient state.

SQLite in WAL mode with synchronous=FULL; one writer thread batches every queued write into
one transaction and one commit (group commit), so `await spool.put(...)` returning means the
message, its body and its recipients are fsynced, and concurrent DATA replies share one
fsync. Bodies are BLOBs in the same database (one commit covers metadata and body).

Chosen by benchmark (benchmarks/spool_bench.py, 2-core VM, ext4-on-virtio, 50 concurrent
putters, 5,000-byte messages) — figures in the report and below:
FIGURES
"""

from relay.spool.queue_id import is_queue_id, new_queue_id
from relay.spool.store import Spool
from relay.spool.types import RcptStatus, RecipientUpdate, SpoolMessage, SpoolRecipient
from relay.spool.writer import WriterStats

__all__ = [
    "RcptStatus",
    "RecipientUpdate",
    "Spool",
    "SpoolMessage",
    "SpoolRecipient",
    "WriterStats",
    "is_queue_id",
    "new_queue_id",
]
