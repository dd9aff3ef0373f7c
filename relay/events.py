"""Events: the mail log (one JSON line per disposition) and the Prometheus metrics behind it.

Every stage reports dispositions here and nowhere else, so the log and the metrics always
agree. The mail log is for people and log shippers; debug tracing goes to the `relay` logger.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.model import Disposition


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.received = Counter("relay_received_messages", "Messages accepted (250 after DATA)",
                                ["org"], registry=r)
        self.rejected = Counter("relay_rejected", "Transactions or commands refused", ["reason"],
                                registry=r)
        self.outcomes = Counter("relay_recipients", "Recipient dispositions after a delivery attempt",
                                ["disposition", "upstream", "org"], registry=r)
        self.limit_hits = Counter("relay_limit_hits", "Intake limits or upstream throttles hit",
                                  ["scope"], registry=r)
        self.queue_depth = Gauge("relay_queue_messages", "Messages waiting, by upstream",
                                 ["upstream"], registry=r)
        self.queue_oldest = Gauge("relay_queue_oldest_age_seconds",
                                  "Age of the oldest waiting message, by upstream", ["upstream"],
                                  registry=r)
        self.delivery_latency = Histogram(
            "relay_delivery_seconds", "Time from reception to delivery", ["upstream"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400),
        )
        self.spool_commit = Histogram("relay_spool_put_seconds", "Time from end of DATA to durable",
                                      registry=r, buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05,
                                                           0.1, 0.25, 0.5, 1, 2.5))
        self.limits_degraded = Gauge("relay_limits_backend_degraded",
                                     "1 while the shared limits backend is unreachable", registry=r)


class MailLog:
    """One JSON object per line. Writes are serialised; a failing log never stops mail."""

    def __init__(self, target: str = "-", metrics: Metrics | None = None) -> None:
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
        try:
            with self._lock:
                self._out.write(line + "\n")
        except (OSError, ValueError):
            pass  # the mail log must never be the reason mail stops

    def close(self) -> None:
        if self._own:
            self._out.close()
