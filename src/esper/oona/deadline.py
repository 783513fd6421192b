"""A handler deadline that costs no timer per handler.

Why not ``asyncio.timeout()``: it schedules and cancels a timer handle on
every use, and each cancelled handle stays in the event loop's heap until its
time would have come (30 s by default), so under load the loop's heap churns
with tens of thousands of dead timers. A subscription runs its handlers one
after another in one task, so one lazily re-armed timer covers them all:
starting a handler only records when it is due; the timer, when it fires,
re-arms itself for the running handler's due time, or cancels the task if
that time has passed. It therefore fires at most about once per timeout.

The cancellation is turned into ``TimeoutError`` exactly as
``asyncio.timeout()`` does, and a cancellation from anyone else is left alone.
Use one instance per task (handlers of one task run one at a time).
"""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    EXPIRING = "expiring"
    EXPIRED = "expired"


class HandlerDeadline:
    """``async with deadline:`` runs its body under ``timeout_s``; reusable, one task at a time."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._state = _State.IDLE
        self._due: float | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def expired(self) -> bool:
        """Whether the last body ran out of time."""
        return self._state is _State.EXPIRED

    async def __aenter__(self) -> HandlerDeadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("HandlerDeadline must be used inside a task")
        if self._state in (_State.RUNNING, _State.EXPIRING):
            raise RuntimeError("HandlerDeadline is already in use")
        loop = asyncio.get_running_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._state = _State.RUNNING
        self._due = due = loop.time() + self.timeout_s
        if self._timer is None or self._timer_loop is not loop:  # (a timer of an ended loop never fires)
            self._timer, self._timer_loop = loop.call_at(due, self._fire), loop
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._due = None
        task, self._task = self._task, None  # keep no finished task (and its frames) alive
        if self._state is _State.EXPIRING:
            self._state = _State.EXPIRED
            ours = task is not None and task.uncancel() <= self._cancelling
            if ours and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc
        else:
            self._state = _State.IDLE

    def _fire(self) -> None:
        self._timer = None
        due, task = self._due, self._task
        if due is None or task is None or self._state is not _State.RUNNING:
            return  # no body running: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._timer = loop.call_at(due, self._fire)
            return
        self._state = _State.EXPIRING
        task.cancel()

    def close(self) -> None:
        """Drop the pending timer (when the task that used this deadline ends)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_loop = None
