"""A circuit breaker that makes callers wait instead of spinning.

Oona keeps one for publishing and one for consuming so that a failure on one
path never blocks the other, and handler exceptions (application bugs) count
against neither. While OPEN, ``wait_ready`` sleeps until the half-open time:
a loop around a failing Redis call therefore backs off by construction.
HALF_OPEN admits trial calls and re-opens on the first failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from esper.leyline import leyline_pb2

CLOSED = leyline_pb2.CIRCUIT_STATE_CLOSED
OPEN = leyline_pb2.CIRCUIT_STATE_OPEN
HALF_OPEN = leyline_pb2.CIRCUIT_STATE_HALF_OPEN


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        timeout_ms: int = 30_000,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.success_threshold = max(1, success_threshold)
        self.timeout_s = timeout_ms / 1000
        self._clock = clock
        self._on_change = on_change
        self._state: leyline_pb2.CircuitBreakerState.ValueType = CLOSED
        self._failures = 0
        self._successes = 0
        self._open_until = 0.0
        self.waits = 0

    @property
    def state(self) -> leyline_pb2.CircuitBreakerState.ValueType:
        if self._state == OPEN and self._clock() >= self._open_until:
            self._set(HALF_OPEN)
        return self._state

    def remaining_s(self) -> float:
        """Seconds until an OPEN breaker admits a trial call (0 when it already would)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    async def wait_ready(self, max_wait_s: float | None = None) -> bool:
        """Wait until calls are allowed; False if that is more than ``max_wait_s`` away.

        When refusing, it still sleeps ``max_wait_s`` first so a caller that
        retries in a loop cannot spin on an open breaker.
        """
        remaining = self.remaining_s()
        if remaining <= 0:
            return True
        self.waits += 1
        if max_wait_s is not None and remaining > max_wait_s:
            await asyncio.sleep(max_wait_s)
            return self.state != OPEN
        await asyncio.sleep(remaining)
        return self.state != OPEN

    def record_success(self) -> None:
        state = self.state
        if state == CLOSED:
            self._failures = 0
        elif state == HALF_OPEN:
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._failures = 0
                self._set(CLOSED)

    def record_failure(self) -> None:
        state = self.state
        if state == HALF_OPEN:
            self._trip()
            return
        if state == CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._trip()

    def force_open(self) -> None:
        self._trip()

    def _trip(self) -> None:
        self._open_until = self._clock() + self.timeout_s
        self._successes = 0
        self._set(OPEN)

    def _set(self, state: leyline_pb2.CircuitBreakerState.ValueType) -> None:
        if state != self._state:
            self._state = state
            if state != CLOSED:
                self._successes = 0
            if self._on_change is not None:
                self._on_change(self.name, int(state))
