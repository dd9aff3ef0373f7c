"""Recent activity of one relay process, for the operator's views (status page, `relay top`):
dispositions per minute over the last hour, running totals, and the latest deferrals and
bounces with the upstream's reply. Bounded: 60 minutes of counters and the last 50 failures."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from relay.core.model import Disposition

MINUTES = 60
RECENT = 50
COUNTED = ("received", "delivered", "deferred", "bounced", "expired", "rejected")
_FAILURES = frozenset({Disposition.DEFERRED, Disposition.BOUNCED, Disposition.EXPIRED})
_RECENT_FIELDS = ("queue_id", "org", "upstream", "recipient", "attempt", "reply", "egress")


class Activity:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # minute (epoch // 60) -> counts by disposition; only the last MINUTES are kept
        self._minutes: dict[int, dict[str, int]] = {}
        self.totals: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def record(self, event: Disposition, fields: dict[str, Any]) -> None:
        name = event.value
        if name not in self.totals:
            return
        now = self._clock()
        minute = int(now // 60)
        with self._lock:
            self.totals[name] += 1
            counts = self._minutes.get(minute)
            if counts is None:
                counts = self._minutes[minute] = dict.fromkeys(COUNTED, 0)
                for old in [m for m in self._minutes if m <= minute - MINUTES]:
                    del self._minutes[old]
            counts[name] += 1
            if event in _FAILURES:
                item = {k: fields[k] for k in _RECENT_FIELDS if fields.get(k) is not None}
                self._recent.append({"ts": round(now, 3), "event": name, **item})

    def snapshot(self) -> dict[str, Any]:
        """{"minutes": [epoch minute, …] (oldest first, MINUTES of them, the current last),
        "per_minute": {disposition: [counts]}, "totals": {…}, "recent": [newest first]}."""
        current = int(self._clock() // 60)
        minutes = list(range(current - MINUTES + 1, current + 1))
        with self._lock:
            per = {name: [self._minutes.get(m, {}).get(name, 0) for m in minutes] for name in COUNTED}
            return {
                "minutes": minutes,
                "per_minute": per,
                "totals": dict(self.totals),
                "recent": list(reversed(self._recent)),
            }
