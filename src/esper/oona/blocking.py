"""Blocking reads that a stop request can abandon at once.

A reader parks in XREAD/XREADGROUP with BLOCK for up to the block time. On
shutdown it should not wait that long, but its own task must not be cancelled
while it is *processing* a batch (the batch must finish and commit). So the
read runs in the reader's own task (no extra task per read: this is the hot
path) and :meth:`BlockingRead.abandon` cancels that task only while it is
parked in the read; the cancellation is then taken back and the read returns
nothing. Entries the server had already handed to that read stay pending for
this consumer and are recovered like those of a crashed one: never lost.

On Python 3.11 a cancellation that lands while the client is still writing
the command is lost (``asyncio.wait_for``, which redis-py wraps around every
write, then returns the finished write instead of raising), and the read
would block for its whole block time. :meth:`BlockingRead.abandon_when`
therefore asks again until the read has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

#: How long a stop waits for a parked read to end before it cancels the read again.
_ASK_AGAIN_S = 0.05


class BlockingRead:
    def __init__(self) -> None:
        self._parked: asyncio.Task[Any] | None = None
        self._cancels = 0
        self._stopped = False
        self._ended = asyncio.Event()

    async def read(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``call()`` unless abandoned (then None); abandoned for good after :meth:`abandon`."""
        if self._stopped:
            return None
        task = asyncio.current_task()
        self._parked = task
        self._ended.clear()
        try:
            return await call()
        except BaseException:
            # Our own cancellation, or the error the Redis client turned it into: taken back.
            if self._cancels and task is not None and task.cancelling() and self._take_back(task) == 0:
                return None
            raise
        finally:
            if self._cancels and task is not None and task.cancelling():
                self._take_back(task)  # the read finished although cancelled: the request was lost
            self._parked = None
            self._ended.set()

    def _take_back(self, task: asyncio.Task[Any]) -> int:
        """Withdraw every cancellation :meth:`abandon` made; the task's remaining requests."""
        remaining = task.cancelling()
        while self._cancels:
            self._cancels -= 1
            remaining = task.uncancel()
        return remaining

    def abandon(self) -> None:
        """Cut a parked read short and refuse further reads."""
        self._stopped = True
        if self._parked is not None:
            self._cancels += 1
            self._parked.cancel()

    async def abandon_when(self, stopping: asyncio.Event) -> None:
        """Owned helper task: abandon the read as soon as ``stopping`` is set, until it has ended."""
        await stopping.wait()
        self.abandon()
        while self._parked is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ASK_AGAIN_S):
                    await self._ended.wait()
            if self._parked is not None:
                self.abandon()
