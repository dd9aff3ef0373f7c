"""The Prometheus metrics of one relay process (the admin API serves them at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.upstream_paused = Gauge("relay_upstream_paused",
                                     "1 while an upstream is paused for a person (credentials,"
                                     " configuration, a daily sending limit)", ["upstream", "kind"],
                                     registry=r)
        self.spool_fs_avail = Gauge("relay_spool_filesystem_avail_bytes",
                                    "Bytes free for the relay on the spool's file system",
                                    registry=r)
        self.spool_fs_size = Gauge("relay_spool_filesystem_size_bytes",
                                   "Size of the spool's file system", registry=r)
        self.waiting = Gauge("relay_queue_waiting_messages",
                             "Queued messages by why they wait (relay queue show says more)",
                             ["reason"], registry=r)
        self.limits_degraded = Gauge("relay_limits_backend_degraded",
                                     "1 while the shared limits backend is unreachable", registry=r)
        self.spool_full = Gauge("relay_spool_full",
                                "1 while the spool cannot write for lack of space", registry=r)
