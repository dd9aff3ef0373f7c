"""Retry timing (pure): exponential-ish schedule from config, with jitter, bounded by max age."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    schedule: tuple[float, ...]  # delay before attempt n+1 after n failures; the last repeats
    jitter: float = 0.2  # ± fraction
    max_age: float = 5 * 86400.0

    def delay(self, failures: int, rand: float) -> float:
        """Seconds to wait after the `failures`-th consecutive failure; `rand` is in [0, 1)."""
        base = self.schedule[min(max(failures, 1), len(self.schedule)) - 1]
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rand - 1.0)))

    def next_attempt(
        self, *, now: float, received_at: float, failures: int, rand: float
    ) -> float | None:
        """When to try again, or None once the message has reached max_age (it expires).
        A delay reaching past max_age is cut short so the last attempt happens at the deadline."""
        deadline = received_at + self.max_age
        if now >= deadline:
            return None
        return min(now + self.delay(failures, rand), deadline)
