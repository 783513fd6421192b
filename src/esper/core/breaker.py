"""The platform's one circuit breaker: callers wait instead of spinning, and probes come early.

Used for Oona's publish and consume paths and Kasmina's kernel fetches. The
state is Leyline's ``CircuitBreakerState`` so telemetry reports it without
translation.

- CLOSED counts consecutive failures; ``failure_threshold`` of them open it.
- OPEN refuses calls until its window ends, then turns HALF_OPEN. The window
  starts at ``open_s`` and doubles with every trip that follows a failed
  probe, up to ``open_max_s``: a brief outage is probed again within
  ``open_s``, a long one is not hammered. Closing resets the window.
- HALF_OPEN admits trial calls; ``success_threshold`` successes close it, any
  failure re-opens it.
- A failure recorded while OPEN (a call that began before the trip and failed
  afterwards) re-arms the current window; a success while OPEN only clears
  the failure count. An operator may ``force`` any state.
- ``wait_ready`` sleeps until the window ends, so a loop around a failing call
  backs off by construction.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeAlias

from esper.leyline import leyline_pb2

BreakerState: TypeAlias = leyline_pb2.CircuitBreakerState.ValueType
CLOSED: BreakerState = leyline_pb2.CIRCUIT_STATE_CLOSED
OPEN: BreakerState = leyline_pb2.CIRCUIT_STATE_OPEN
HALF_OPEN: BreakerState = leyline_pb2.CIRCUIT_STATE_HALF_OPEN


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 3,
        success_threshold: int = 1,
        open_s: float = 30.0,
        open_max_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        if open_s <= 0:
            raise ValueError("open_s must be positive")
        self.name = name
        self.failure_threshold = max(1, failure_threshold)
        self.success_threshold = max(1, success_threshold)
        self.open_s = open_s
        self.open_max_s = max(open_s, open_max_s if open_max_s is not None else open_s)
        self._clock = clock
        self._on_change = on_change
        self._state: BreakerState = CLOSED
        #: Failures recorded since the breaker last closed (or since the last success).
        self.failures = 0
        self._successes = 0
        self._window_s = open_s
        self._open_until = 0.0
        #: Times a caller had to wait on an open breaker.
        self.waits = 0
        #: Times the breaker opened.
        self.trips = 0

    @property
    def state(self) -> BreakerState:
        """The state, moving OPEN -> HALF_OPEN once the open window has passed."""
        if self._state == OPEN and self._clock() >= self._open_until:
            self._set(HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        return self.state != OPEN

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
        if self.state == HALF_OPEN:
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._close()
        else:
            self.failures = 0

    def record_failure(self) -> None:
        state = self.state
        self.failures += 1
        if state == OPEN:
            self._open_until = self._clock() + self._window_s
        elif state == HALF_OPEN:
            self._window_s = min(self.open_max_s, self._window_s * 2)
            self._open()
        elif self.failures >= self.failure_threshold:
            self._open()

    def force(self, desired: BreakerState) -> bool:
        """Apply an operator command; False for a value that is not a breaker state."""
        if desired == OPEN:
            self.failures = max(self.failures, self.failure_threshold)
            self._open()
        elif desired == CLOSED:
            self._close()
        elif desired == HALF_OPEN:
            self._successes = 0
            self._set(HALF_OPEN)
        else:
            return False
        return True

    def _open(self) -> None:
        self._open_until = self._clock() + self._window_s
        self._successes = 0
        self.trips += 1
        self._set(OPEN)

    def _close(self) -> None:
        self.failures = 0
        self._successes = 0
        self._window_s = self.open_s
        self._set(CLOSED)

    def _set(self, state: BreakerState) -> None:
        if state != self._state:
            self._state = state
            if state != CLOSED:
                self._successes = 0
            if self._on_change is not None:
                self._on_change(self.name, int(state))
