"""The one circuit breaker: thresholds, growing open window, operator force, waiting."""

from __future__ import annotations

import asyncio

import pytest

from esper.core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    changes: list[tuple[str, int]] = []
    breaker = CircuitBreaker(
        "t", failure_threshold=2, open_s=1.0, clock=clock, on_change=lambda *c: changes.append(c)
    )
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == CLOSED
    breaker.record_failure()
    assert breaker.state == OPEN
    assert not breaker.allow()
    assert breaker.remaining_s() == pytest.approx(1.0)
    clock.now += 1.0
    assert breaker.state == HALF_OPEN
    breaker.record_success()
    assert breaker.state == CLOSED
    assert [state for _, state in changes] == [OPEN, HALF_OPEN, CLOSED]


def test_failed_probes_double_the_window_up_to_the_cap_and_closing_resets_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=1, open_s=0.5, open_max_s=2.0, clock=clock)
    breaker.record_failure()
    windows = []
    for _ in range(4):
        windows.append(breaker.remaining_s())
        clock.now += breaker.remaining_s()
        assert breaker.state == HALF_OPEN
        breaker.record_failure()  # the probe failed
    assert windows == pytest.approx([0.5, 1.0, 2.0, 2.0])
    clock.now += breaker.remaining_s()
    breaker.record_success()
    assert breaker.state == CLOSED
    breaker.record_failure()
    assert breaker.remaining_s() == pytest.approx(0.5)


def test_half_open_needs_the_success_threshold() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=1, success_threshold=2, open_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    breaker.record_success()
    assert breaker.state == HALF_OPEN
    breaker.record_success()
    assert breaker.state == CLOSED


def test_a_late_failure_while_open_re_arms_the_window() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=1, open_s=10.0, clock=clock)
    breaker.record_failure()
    clock.now += 8
    breaker.record_failure()
    assert breaker.remaining_s() == pytest.approx(10.0)
    assert breaker.failures == 2


def test_force_sets_any_state_and_refuses_others() -> None:
    breaker = CircuitBreaker("t")
    assert breaker.force(OPEN)
    assert breaker.state == OPEN
    assert breaker.force(HALF_OPEN)
    assert breaker.state == HALF_OPEN
    assert breaker.force(CLOSED)
    assert breaker.state == CLOSED
    assert breaker.failures == 0
    assert not breaker.force(99)  # type: ignore[arg-type]


async def test_wait_ready_sleeps_until_half_open_or_gives_up_after_max_wait() -> None:
    breaker = CircuitBreaker("t", failure_threshold=1, open_s=0.05)
    breaker.record_failure()
    assert await breaker.wait_ready(max_wait_s=0.01) is False
    assert await asyncio.wait_for(breaker.wait_ready(), 1.0) is True
    assert breaker.state == HALF_OPEN
    assert breaker.waits == 2
