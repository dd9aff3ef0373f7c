"""A worker's place among the processes of one machine, and its part of what stays split.

`relay serve` with `workers: N` runs N processes. Upstream limits (quotas, connections,
intervals, pauses) are shared exactly between them through one database under the spool
directory (relay/limits/machine.py). What is checked per message on the intake hot path —
the sliding intake windows and the connections per client address — is split instead:
worker i of N enforces `amount // N`, plus one for the first `amount % N` workers, so the
parts add up to the configured limit (stricter, never looser, for a client that keeps one
connection open and so talks to one worker). The Redis backend shares those too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Partition:
    index: int  # this worker
    count: int  # of this many

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker {self.index} of {self.count}")


def part(amount: int, index: int, count: int) -> int:
    """Worker `index`'s part of `amount` split over `count` workers (at least 1)."""
    return max(1, amount // count + (1 if index < amount % count else 0))
