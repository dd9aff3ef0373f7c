"""Scheduler: when each queued message is tried, on which upstream, and how many at once."""

from relay.scheduler.scheduler import ACTIVE, READY, WAITING, Entry, Scheduler, UpstreamQueue

__all__ = ["ACTIVE", "READY", "WAITING", "Entry", "Scheduler", "UpstreamQueue"]
