"""The mail log: one JSON line per disposition, and the metrics counted with each line.

Every stage reports dispositions here and nowhere else, so the log and the metrics always
agree. The mail log is for people and log shippers; debug tracing goes to the `relay` logger.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import IO, Any

from relay.core import jsonline
from relay.core.model import Disposition
from relay.events.activity import Activity
from relay.events.metrics import Metrics


class MailLog:
    """One JSON object per line. Writes are serialised; a failing log never stops mail.

    On an event loop, the lines of one loop iteration go out in one write at its end
    (`call_soon`): two lines per message cost two write calls otherwise, ~3% of the event
    loop at 5 KB (benchmarks/RESULTS.md §11). Off a loop, each line is written at once."""

    def __init__(self, target: str = "-", metrics: Metrics | None = None) -> None:
        self.activity = Activity()  # the last hour, for the operator's views
        self._lock = threading.Lock()
        self._own = target != "-"
        self._out: IO[str] = open(target, "a", buffering=1, encoding="utf-8") if self._own else sys.stderr
        self.metrics = metrics or Metrics()
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, event: Disposition, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event.value}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = jsonline.dumps(record)
        m = self.metrics
        if event is Disposition.RECEIVED:
            m.received.labels(fields.get("org", "")).inc()
        elif event is Disposition.REJECTED:
            m.rejected.labels(fields.get("reason", "other")).inc()
        elif event in (Disposition.DELIVERED, Disposition.DEFERRED, Disposition.BOUNCED,
                       Disposition.EXPIRED):
            m.outcomes.labels(event.value, fields.get("upstream", ""), fields.get("org", "")).inc()
            if event is Disposition.DELIVERED and "delay" in fields:
                m.delivery_latency.labels(fields.get("upstream", "")).observe(float(fields["delay"]))
        self.activity.record(event, fields)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(line)
            if loop is None:
                self._write_pending()
            elif not self._scheduled:
                self._scheduled = True
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines emitted so far."""
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        text = "\n".join(self._pending) + "\n"
        self._pending.clear()
        try:
            self._out.write(text)
        except (OSError, ValueError):
            pass  # the mail log must never be the reason mail stops

    def close(self) -> None:
        self.flush()
        if self._own:
            self._out.close()
