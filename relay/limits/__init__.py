"""Rate limits, quotas and upstream throttles, on one node (memory) or shared (Redis).

Limits decide *when* mail goes, never *whether*: intake limits answer 451 before anything
is accepted; upstream throttles make accepted mail wait in the spool.

    limits = Limits.from_config(config, metrics)
    Intake(..., limiter=limits.limiter); Scheduler(..., gate=limits.gate)
    ...
    await limits.close()

Modules: `store` (counting windows, leases, intervals, pauses; in memory), `machine` (the
memory backend: shared by this machine's processes and kept across restarts in
`spool/limits/limits.db`), `redis_store` (the same in Redis, across nodes), `failover` (what
happens while Redis is unreachable), `partition` (a worker's part of the intake limits),
`intake` (the intake limiter), `gate` (the upstream gate), `usage` (current use, for
`relay route`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from relay.config.model import Config
from relay.config.schema import LimitsConf
from relay.events import Metrics
from relay.limits.failover import BackendUnavailable, Failover
from relay.limits.gate import UpstreamGate, quota_windows
from relay.limits.intake import IntakeRateLimiter, intake_windows
from relay.limits.machine import MachineStore
from relay.limits.partition import Partition, part
from relay.limits.redis_store import RedisStore
from relay.limits.store import Lease, MemoryStore, Store, Window

__all__ = [
    "BackendUnavailable",
    "Failover",
    "IntakeRateLimiter",
    "Lease",
    "Limits",
    "MachineStore",
    "MemoryStore",
    "RedisStore",
    "Store",
    "UpstreamGate",
    "Window",
    "intake_windows",
    "make_store",
    "node_id",
    "quota_windows",
]


def node_id(conf: LimitsConf, worker: int | None = None) -> str:
    """This process's name in shared limits. Workers of one node share a configured node id,
    so each adds its index: their lease tokens never collide."""
    if conf.node_id:
        return conf.node_id if worker is None else f"{conf.node_id}-w{worker}"
    return f"{socket.gethostname()}-{os.getpid()}"


def make_store(
    conf: LimitsConf,
    metrics: Metrics | None = None,
    partition: Partition | None = None,
    directory: Path | None = None,
) -> Store:
    """The store `conf` asks for: memory (this machine, kept in `directory`; only in this
    process's memory without one), or Redis behind the failover. `partition` is this
    worker's place when the process is one of several workers."""
    if conf.backend == "memory":
        nid = node_id(conf, partition.index if partition else None)
        if directory is not None:
            return MachineStore(directory, partition, node_id=nid)
        return MemoryStore(nid)
    if not conf.redis_url:
        raise ValueError("limits.backend redis needs limits.redis_url")
    gauge = metrics.limits_degraded if metrics is not None else None

    def on_change(degraded: bool) -> None:
        if gauge is not None:
            gauge.set(1 if degraded else 0)

    return Failover(
        RedisStore(
            conf.redis_url,
            node_id=node_id(conf, partition.index if partition else None),
            timeout=conf.redis_timeout,
        ),
        share=conf.fallback_share,
        mode=conf.on_backend_failure,
        retry=conf.redis_retry,
        on_change=on_change,
    )


def limits_dir(config: Config) -> Path:
    """Where the memory backend keeps this machine's limits: next to the spool shards."""
    return config.spool_path / "limits"


def _backend_key(conf: LimitsConf) -> tuple[object, ...]:
    return (
        conf.backend,
        conf.redis_url,
        conf.on_backend_failure,
        conf.node_id,
        conf.redis_timeout,
        conf.redis_retry,
        conf.fallback_share,
    )


class Limits:
    """The intake limiter and the upstream gate of one node, over one store."""

    def __init__(
        self,
        conf: LimitsConf,
        metrics: Metrics,
        partition: Partition | None = None,
        directory: Path | None = None,
    ) -> None:
        self.conf = conf
        self.metrics = metrics
        self.partition = partition
        self.store = make_store(conf, metrics, partition, directory)
        self.limiter = IntakeRateLimiter(
            self.store, metrics, max_connections=self._client_connections(conf)
        )
        self.gate = UpstreamGate(
            self.store,
            metrics,
            lease_ttl=conf.lease_ttl,
            slow_down_initial=conf.slow_down_initial,
            slow_down_max=conf.slow_down_max,
        )
        metrics.limits_degraded.set(0)

    @classmethod
    def from_config(
        cls, config: Config, metrics: Metrics, partition: Partition | None = None
    ) -> Limits:
        """The node's limits; the memory backend keeps them in `spool/limits/`."""
        return cls(config.relay.limits, metrics, partition, limits_dir(config))

    def _client_connections(self, conf: LimitsConf) -> int | None:
        """Concurrent connections per client are counted in each process (whatever the
        backend): split them between the workers too."""
        n = conf.client.max_connections
        if n is None or self.partition is None:
            return n
        return part(n, self.partition.index, self.partition.count)

    def same_backend(self, conf: LimitsConf) -> bool:
        return _backend_key(conf) == _backend_key(self.conf)

    def reconfigure(self, conf: LimitsConf) -> None:
        """A reload with the same backend: new values, same counters and leases."""
        self.conf = conf
        self.limiter.max_connections = self._client_connections(conf)
        self.gate.lease_ttl = conf.lease_ttl
        self.gate.slow_down_initial = conf.slow_down_initial
        self.gate.slow_down_max = conf.slow_down_max

    async def close(self) -> None:
        await self.gate.close()
        await self.store.close()
