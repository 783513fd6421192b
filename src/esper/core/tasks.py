"""Structured-concurrency helpers for long-running components awaited by an owner.

Every bus component (Oona's consumers, Kasmina's intake and prefetch
coordinator, Tamiyo's service) runs as ``await component.run()`` in a task
its owner awaits, and is ended by ``await component.stop()``. The handshake
between the two is the same everywhere, so it lives here once:
:class:`RunGuard` refuses a second concurrent ``run`` and makes ``stop``
return only after ``run`` has, and :func:`wait_first` waits on several
stop events (the component's own and the caller's) without polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


async def wait_first(*events: asyncio.Event, limit_s: float | None = None) -> bool:
    """Wait until any of ``events`` is set (True) or ``limit_s`` passes (False). No polling."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return bool(done)


class RunGuard:
    """The run/stop handshake of one component (``what`` names it in the error).

    Wrap the body of ``run`` in :meth:`running`; ``stop`` sets
    :attr:`stop_event` and waits until that body has left, so a caller that
    awaited ``stop()`` knows the work in flight is finished.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.stop_event = asyncio.Event()
        self._done = asyncio.Event()
        self.running = False

    @contextmanager
    def running_scope(self, *, rearm: bool = True) -> Iterator[None]:
        """Mark the component running for the ``with`` body; a second concurrent run is refused.

        ``rearm`` clears an earlier stop request, so a stopped component can
        be run again; without it a ``stop()`` that came before ``run`` wins.
        """
        if self.running:
            raise RuntimeError(f"{self.what} is already running")
        self.running = True
        self._done.clear()
        if rearm:
            self.stop_event.clear()
        try:
            yield
        finally:
            self.running = False
            self._done.set()

    def stops(self, extra: asyncio.Event | None = None) -> tuple[asyncio.Event, ...]:
        """The events that end the run: the guard's own and, when given, the caller's."""
        return (self.stop_event,) if extra is None else (self.stop_event, extra)

    async def wait_stopped(self) -> None:
        """Return once no run is in progress (at once when none is)."""
        if self.running:
            await self._done.wait()

    async def stop(self) -> None:
        """Ask the run to finish and wait until it has."""
        self.stop_event.set()
        await self.wait_stopped()
