"""Scheduler: when each queued message is tried, on which upstream, and how many at once.

scheduler.py (timers, dispatch, delivery tasks, operator actions), entry.py (a queued
message in memory), queues.py (fair ready queues), window.py (the bounded in-memory window
over the spool), outcomes.py (recording an attempt), retry.py (the retry schedule),
ports.py (what it asks of delivery, the throttles and the bounce stage).
"""

from relay.scheduler.entry import ACTIVE, READY, WAITING, Entry
from relay.scheduler.queues import UpstreamQueue
from relay.scheduler.scheduler import Scheduler

__all__ = ["ACTIVE", "READY", "WAITING", "Entry", "Scheduler", "UpstreamQueue"]
