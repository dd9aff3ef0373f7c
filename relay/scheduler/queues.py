"""Ready queues: per upstream, one FIFO per organisation, served round robin (fair between
organisations sharing an upstream), with the upstream's pause and in-flight count."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from relay.core.waits import Wait
from relay.scheduler.entry import Entry


@dataclass
class UpstreamQueue:
    """The ready queue of one upstream: one FIFO per organisation, served round robin."""

    upstream_id: str
    by_org: dict[str, deque[Entry]] = field(default_factory=dict)
    turn: deque[str] = field(default_factory=deque)
    active: int = 0
    size: int = 0
    paused_until: float = 0.0
    waking: bool = False
    why: Wait | None = None  # the last "not yet" (a quota, a pause, ...): why its mail waits
    # Every connection was held (by this process's deliveries or another worker's): run
    # `slot_tasks` deliveries, and from `slots_until` on one more that asks for a connection
    # (each that gets one lets one more ask). None: not short of connections.
    slot_tasks: int | None = None
    slots_until: float = 0.0

    def push(self, e: Entry) -> None:
        q = self.by_org.get(e.org)
        if q is None:
            q = self.by_org[e.org] = deque()
            self.turn.append(e.org)
        q.append(e)
        self.size += 1

    def pop(self) -> Entry | None:
        while self.turn:
            org = self.turn.popleft()
            q = self.by_org[org]
            e = q.popleft()
            self.size -= 1
            if q:
                self.turn.append(org)
            else:
                del self.by_org[org]
            return e
        return None

    def pop_tail(self) -> Entry | None:
        """The newest entry of the organisation with the longest line (set aside first when
        memory is needed: it would be served last, and it keeps the others' turns)."""
        if not self.by_org:
            return None
        org = max(self.by_org, key=lambda o: len(self.by_org[o]))
        q = self.by_org[org]
        e = q.pop()
        self.size -= 1
        if not q:
            del self.by_org[org]
            self.turn.remove(org)
        return e

    def unpop(self, e: Entry) -> None:
        """Put back at the head (a throttle said not yet). The organisation gets its turn
        back too: `pop` sent it to the end of the line, and if it stayed there, a throttle
        that opens once per pop would only ever let the *other* organisation through."""
        q = self.by_org.get(e.org)
        if q is None:
            q = self.by_org[e.org] = deque()
        else:
            self.turn.remove(e.org)
        self.turn.appendleft(e.org)
        q.appendleft(e)
        self.size += 1
