"""The AUTH penalty box: per-client-IP counting of failed logins across connections, and
the cool-off that follows (password guessing is throttled, then cut off).

The listener already ends one connection after a few failed AUTH attempts; a guesser simply
reconnects. This box remembers failures per IP address for `window` seconds. Once an address
reaches `max_failures` within the window it is blocked for a cool-off that doubles with each
new block (`cooloff`, twice that, four times, … up to `max_cooloff`), in the spirit of Postfix's anvil and
fail2ban. While blocked, every AUTH from that address is refused with 421 4.7.0 *before* the
password is checked (a blocked guesser learns nothing), and connections from it are refused
unless it is an allowlisted network (which needs no AUTH to relay; blocking it would let a
guesser on a shared NAT lock the platform's own applications out).

State is in memory and per process: a restart forgets it (documented in SECURITY.md). Memory
is bounded: at most `max_entries` addresses are tracked; the stalest are dropped first.
Thread-safe, because `Intake.authenticate` runs in a worker thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Record:
    failures: list[float] = field(default_factory=list)  # timestamps within the window
    strikes: int = 0  # blocks so far; the next cool-off is cooloff * 2**strikes
    blocked_until: float = 0.0
    last_seen: float = 0.0


class PenaltyBox:
    """Failed-AUTH accounting per client address. `clock` is injectable for tests."""

    def __init__(
        self,
        *,
        max_failures: int = 5,
        window: float = 600.0,
        cooloff: float = 60.0,
        max_cooloff: float = 3600.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or window <= 0 or cooloff <= 0 or max_cooloff < cooloff:
            raise ValueError("PenaltyBox: invalid limits")
        self.max_failures = max_failures
        self.window = window
        self.cooloff = cooloff
        self.max_cooloff = max_cooloff
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def blocked_for(self, ip: str) -> float:
        """Seconds this address stays blocked (0.0 when it is not blocked)."""
        now = self._clock()
        with self._lock:
            record = self._records.get(ip)
            if record is None:
                return 0.0
            return max(0.0, record.blocked_until - now)

    def failure(self, ip: str) -> float:
        """Record one failed AUTH; returns the cool-off (seconds) if this failure started a
        block, else 0.0."""
        now = self._clock()
        with self._lock:
            record = self._records.pop(ip, None) or _Record()
            self._records[ip] = record  # most recently seen last
            record.last_seen = now
            record.failures = [t for t in record.failures if now - t < self.window]
            record.failures.append(now)
            started = 0.0
            if len(record.failures) >= self.max_failures and record.blocked_until <= now:
                started = min(self.cooloff * 2**record.strikes, self.max_cooloff)
                record.strikes += 1
                record.blocked_until = now + started
                record.failures.clear()  # the next block needs a fresh run of failures
            self._prune(now)
            return started

    def success(self, ip: str) -> None:
        """A successful AUTH clears the failure count (but not the strikes: a guesser that
        finds one password should not reset its own escalation)."""
        with self._lock:
            record = self._records.get(ip)
            if record is not None:
                record.failures.clear()

    def _prune(self, now: float) -> None:
        # Forget addresses that are neither blocked nor have recent failures; then, if still
        # too many, the least recently seen (bounded memory under a distributed attack).
        horizon = max(self.window, self.max_cooloff)
        while self._records:
            ip, record = next(iter(self._records.items()))
            stale = now - record.last_seen > horizon and record.blocked_until <= now
            if not stale and len(self._records) <= self.max_entries:
                break
            del self._records[ip]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)
