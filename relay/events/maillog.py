"""The mail log: one JSON line per disposition, and the metrics counted with each line.

Every stage reports dispositions here and nowhere else, so the log and the metrics always
agree. The mail log is for people and log shippers; debug tracing goes to the `relay` logger.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from relay.core.model import Disposition
from relay.events.activity import Activity
from relay.events.metrics import Metrics


class MailLog:
    """One JSON object per line. Writes are serialised; a failing log never stops mail."""

    def __init__(self, target: str = "-", metrics: Metrics | None = None) -> None:
        self.activity = Activity()  # the last hour, for the operator's views
        self._lock = threading.Lock()
        self._own = target != "-"
        self._out: IO[str] = open(target, "a", buffering=1, encoding="utf-8") if self._own else sys.stderr
        self.metrics = metrics or Metrics()

    def emit(self, event: Disposition, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event.value}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
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
            with self._lock:
                self._out.write(line + "\n")
        except (OSError, ValueError):
            pass  # the mail log must never be the reason mail stops

    def close(self) -> None:
        if self._own:
            self._out.close()
