"""Blocking reads that a stop request can abandon at once.

A reader parks in XREAD/XREADGROUP with BLOCK for up to the block time. On
shutdown it should not wait that long, but its own task must not be cancelled
while it is *processing* a batch (the batch must finish and commit). So the
read runs in the reader's own task (no extra task per read: this is the hot
path) and :meth:`BlockingRead.abandon` cancels that task only while it is
parked in the read; the cancellation is then taken back and the read returns
nothing. Entries the server had already handed to that read stay pending for
this consumer and are recovered like those of a crashed one: never lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class BlockingRead:
    def __init__(self) -> None:
        self._parked: asyncio.Task[Any] | None = None
        self._abandoning = False
        self._stopped = False

    async def read(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``call()`` unless abandoned (then None); abandoned for good after :meth:`abandon`."""
        if self._stopped:
            return None
        task = asyncio.current_task()
        self._parked = task
        try:
            return await call()
        except BaseException:
            # Our own cancellation, or the error the Redis client turned it into: taken back.
            if self._abandoning and task is not None and task.cancelling() and task.uncancel() == 0:
                return None
            raise
        finally:
            self._parked = None
            self._abandoning = False

    def abandon(self) -> None:
        """Cut a parked read short and refuse further reads."""
        self._stopped = True
        if self._parked is not None and not self._abandoning:
            self._abandoning = True
            self._parked.cancel()

    async def abandon_when(self, stopping: asyncio.Event) -> None:
        """Owned helper task: abandon the read as soon as ``stopping`` is set."""
        await stopping.wait()
        self.abandon()
