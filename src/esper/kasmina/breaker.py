"""Kasmina's kernel-fetch circuit breaker (3 failures, 60 s open, 2 successes).

It guards the kernel acquisition path only: when kernels keep failing,
timing out or arriving over the latency budget, new grafts go straight to the
fallback instead of hammering a broken forge. The state is the Leyline
``CircuitBreakerState`` so telemetry reports it without translation.

Why not :class:`esper.oona.CircuitBreaker` with these thresholds: the
semantics differ where Kasmina relies on them. An operator command can force
this breaker CLOSED or HALF_OPEN (``COMMAND_CIRCUIT_BREAKER``); ``failures``
is public and reported (``kasmina.breaker.failures``) and counts every
recorded failure; a failure recorded while OPEN (a request sent before the
breaker opened that times out afterwards) re-arms the full open window,
and a success while OPEN clears the count. Oona's breaker ignores both while
OPEN and cannot be forced closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

from esper.leyline import leyline_pb2

BreakerState: TypeAlias = leyline_pb2.CircuitBreakerState.ValueType


class KasminaCircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        open_seconds: float = 60.0,
        success_threshold: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.open_seconds = open_seconds
        self.success_threshold = success_threshold
        self._clock = clock
        self._state: BreakerState = leyline_pb2.CIRCUIT_STATE_CLOSED
        self.failures = 0
        self._successes = 0
        self._open_until = 0.0

    @property
    def state(self) -> BreakerState:
        """The state, moving OPEN -> HALF_OPEN once the open window has passed."""
        if self._state == leyline_pb2.CIRCUIT_STATE_OPEN and self._clock() >= self._open_until:
            self._state = leyline_pb2.CIRCUIT_STATE_HALF_OPEN
            self._successes = 0
        return self._state

    def allow(self) -> bool:
        return self.state != leyline_pb2.CIRCUIT_STATE_OPEN

    def record_success(self) -> None:
        if self.state == leyline_pb2.CIRCUIT_STATE_HALF_OPEN:
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._close()
        else:
            self.failures = 0

    def record_failure(self) -> None:
        state = self.state
        self.failures += 1
        if state == leyline_pb2.CIRCUIT_STATE_HALF_OPEN or self.failures >= self.failure_threshold:
            self._open()

    def force(self, desired: BreakerState) -> bool:
        """Apply an operator command; False for a state that cannot be forced."""
        if desired == leyline_pb2.CIRCUIT_STATE_OPEN:
            self.failures = max(self.failures, self.failure_threshold)
            self._open()
        elif desired == leyline_pb2.CIRCUIT_STATE_CLOSED:
            self._close()
        elif desired == leyline_pb2.CIRCUIT_STATE_HALF_OPEN:
            self._state = leyline_pb2.CIRCUIT_STATE_HALF_OPEN
            self._successes = 0
        else:
            return False
        return True

    def _open(self) -> None:
        self._state = leyline_pb2.CIRCUIT_STATE_OPEN
        self._open_until = self._clock() + self.open_seconds
        self._successes = 0

    def _close(self) -> None:
        self._state = leyline_pb2.CIRCUIT_STATE_CLOSED
        self.failures = 0
        self._successes = 0
