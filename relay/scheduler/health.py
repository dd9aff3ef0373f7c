"""Upstreams paused for a person: a credential, configuration or daily-sending-limit problem
(relay.delivery.providers decides which replies mean that).

While an upstream is paused its mail waits in its ready queue: nothing is tried, nothing is
bounced, no retry is counted. A pause "until fixed" is looked at again after `recheck`
(5 minutes, doubling to an hour) with a single delivery (one message in flight: a probe);
a sending-limit pause after its own seconds. It ends at once when a delivery succeeds, when
`relay test-upstream` (through the running relay) succeeds, or at a reload (the usual fix:
a new secret). The scheduler consults `until()` before dispatching and `probing()` for its
concurrency; `relay queue`, the metrics and the mail log show the reason and the next step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.core.model import UpstreamPause

RECHECK_INITIAL = 300.0
RECHECK_MAX = 3600.0


@dataclass
class Paused:
    pause: UpstreamPause
    since: float
    until: float
    recheck: float  # the next "until fixed" interval

    def as_dict(self, now: float) -> dict[str, Any]:
        return {
            "kind": self.pause.kind,
            "reason": self.pause.reason,
            "next_step": self.pause.next_step,
            "since": round(self.since, 3),
            "retry_in": round(max(0.0, self.until - now), 1),
            "until_fixed": self.pause.seconds is None,
        }


class UpstreamHealth:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        recheck_initial: float = RECHECK_INITIAL,
        recheck_max: float = RECHECK_MAX,
    ) -> None:
        self.clock = clock
        self.recheck_initial = recheck_initial
        self.recheck_max = recheck_max
        self._paused: dict[str, Paused] = {}

    def pause(self, upstream_id: str, pause: UpstreamPause) -> Paused:
        now = self.clock()
        old = self._paused.get(upstream_id)
        if pause.seconds is not None:
            until, recheck = now + pause.seconds, old.recheck if old else self.recheck_initial
        else:
            wait = old.recheck if old else self.recheck_initial
            until, recheck = now + wait, min(self.recheck_max, wait * 2)
        p = Paused(pause, old.since if old else now, until, recheck)
        self._paused[upstream_id] = p
        return p

    def until(self, upstream_id: str) -> float:
        """When the upstream may be tried again (0: not paused)."""
        p = self._paused.get(upstream_id)
        return p.until if p is not None else 0.0

    def probing(self, upstream_id: str) -> bool:
        """Paused, but its time to look again has come: one delivery at a time."""
        p = self._paused.get(upstream_id)
        return p is not None and p.until <= self.clock()

    def clear(self, upstream_id: str) -> bool:
        return self._paused.pop(upstream_id, None) is not None

    def clear_kinds(self, kinds: tuple[str, ...]) -> list[str]:
        """A reload: pauses a new configuration may have fixed end (sending-limit pauses stay)."""
        cleared = [u for u, p in self._paused.items() if p.pause.kind in kinds]
        for u in cleared:
            del self._paused[u]
        return cleared

    def get(self, upstream_id: str) -> Paused | None:
        return self._paused.get(upstream_id)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {u: p.as_dict(now) for u, p in sorted(self._paused.items())}
