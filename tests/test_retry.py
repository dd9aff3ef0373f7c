"""Retry timing: the schedule, jitter bounds and the max-age deadline (pure, property-tested)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.scheduler.retry import RetryPolicy

schedules = st.lists(st.floats(min_value=0.5, max_value=86400), min_size=1, max_size=8).map(tuple)


def test_schedule_steps_then_repeats_the_last_delay() -> None:
    p = RetryPolicy((60.0, 300.0, 900.0), jitter=0.0, max_age=10**6)
    assert [p.delay(n, 0.5) for n in (1, 2, 3, 4, 10)] == [60.0, 300.0, 900.0, 900.0, 900.0]


@given(schedules, st.floats(0, 1), st.integers(1, 50), st.floats(0, 0.999999))
def test_jitter_stays_within_its_fraction(schedule: tuple[float, ...], jitter: float, n: int, r: float) -> None:
    p = RetryPolicy(schedule, jitter=jitter, max_age=10**9)
    base = schedule[min(n, len(schedule)) - 1]
    d = p.delay(n, r)
    assert base * (1 - jitter) - 1e-9 <= d <= base * (1 + jitter) + 1e-9


@given(schedules, st.floats(1, 10**6), st.floats(0, 2 * 10**6), st.integers(1, 30), st.floats(0, 0.999999))
def test_next_attempt_never_passes_the_deadline(
    schedule: tuple[float, ...], max_age: float, age: float, n: int, r: float
) -> None:
    p = RetryPolicy(schedule, jitter=0.2, max_age=max_age)
    received, now = 1_000_000.0, 1_000_000.0 + age
    when = p.next_attempt(now=now, received_at=received, failures=n, rand=r)
    if age >= max_age:
        assert when is None  # expired: no further attempt
    else:
        assert when is not None and now <= when <= received + max_age
