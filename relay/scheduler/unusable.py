"""Since when each upstream has been unusable, as this process's deliveries saw it: the
input of the organisations' failover (relay/policy/failover.py).

Unusable means an attempt in which every recipient was deferred for a reason that is the
upstream's, not the message's: no answer or a broken connection (4.4.x), a "slow down"
(421, 4.7.x throttling), TLS or credentials refused (4.7.x, 5.7.x), the upstream unusable as
configured (4.3.5: a missing secret). The first such attempt starts the clock; one delivered
recipient stops it. Kept in memory per process: after a restart the clock starts again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from relay.core.model import Outcome, RecipientResult
from relay.policy.failover import Unusable

_UPSTREAM_FAULTS = ("4.4.", "4.7.", "5.7.", "4.3.5")


def upstream_fault(results: Sequence[RecipientResult]) -> str | None:
    """Why this attempt says the upstream is unusable (None: it does not)."""
    if not results or any(r.outcome is not Outcome.DEFERRED for r in results):
        return None
    r = results[0]
    if r.throttled:
        return f"slowed down: {r.reply}"
    if (r.reply.enhanced or "").startswith(_UPSTREAM_FAULTS):
        return "not answering" if r.reply.enhanced == "4.4.1" else str(r.reply)
    return None


class UnusableSince:
    def __init__(self) -> None:
        self._unusable: dict[str, Unusable] = {}

    def note(self, upstream_id: str, results: Sequence[RecipientResult], now: float) -> None:
        why = upstream_fault(results)
        if why is not None:
            if upstream_id not in self._unusable:
                self._unusable[upstream_id] = Unusable(now, why)
        elif any(r.outcome is Outcome.DELIVERED for r in results):
            self._unusable.pop(upstream_id, None)

    @property
    def unusable(self) -> Mapping[str, Unusable]:
        return self._unusable
