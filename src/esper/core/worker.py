"""The one worker contract: a long-running component is ``async def run(ctx: WorkerContext)``.

Why one contract: a supervisor can only tell the truth about readiness and
liveness if every component reports them the same way. A worker

- calls ``ctx.started()`` once it is really serving (an HTTP server after it
  has bound its port, a bus subscription once its group exists and its first
  read is about to block), never earlier;
- calls ``ctx.progress()`` as it works: after every blocking read returns
  (an idle read that times out counts) and after every message it handles, so
  a long catch-up keeps proving it is alive while a wedged handler does not;
- returns when ``ctx.stopping`` is set (draining what is in flight), and
  lets cancellation through.

A worker that runs several components gives each one its own child context
(:meth:`WorkerContext.child`, or :func:`run_children`); the watchdog then
judges the worker by its *least* recently progressing component, so an idle
sibling can never hide a wedged one. Supervisors build a fresh context for
every attempt, so an abandoned attempt can never keep its successor alive.
Owners that are not supervisors (Nissa's CLI, training processes, tests) use
:func:`running`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any


class WorkerExited(RuntimeError):
    """A component returned while it was supposed to keep running."""


class WorkerContext:
    """What a running component sees: its stop signal, readiness and progress reporting.

    ``clock`` is monotonic seconds; children share their parent's stop
    signal and clock.
    """

    def __init__(
        self,
        name: str,
        *,
        stopping: asyncio.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        #: Set when the component should drain and return.
        self.stopping = stopping if stopping is not None else asyncio.Event()
        self._clock = clock
        self._started = asyncio.Event()
        self._last_progress = clock()
        self._children: dict[str, WorkerContext] = {}

    # -- what a component calls ---------------------------------------------------------

    def started(self) -> None:
        """The component is serving now (idempotent)."""
        self._started.set()
        self._last_progress = self._clock()

    def progress(self) -> None:
        """The component did some work, or an idle wait ended: it is alive."""
        self._last_progress = self._clock()

    def child(self, name: str) -> WorkerContext:
        """A context for one component of this worker, judged on its own by the watchdog.

        Asking again for the same name replaces the earlier child (a restarted
        component starts with a clean record).
        """
        child = WorkerContext(f"{self.name}.{name}", stopping=self.stopping, clock=self._clock)
        self._children[name] = child
        return child

    async def wait_stopping(self, timeout_s: float | None = None) -> bool:
        """Wait until ``stopping`` is set (True) or ``timeout_s`` passes (False); no polling."""
        if self.stopping.is_set():
            return True
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    # -- what an owner reads ------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        return self._started.is_set()

    async def wait_started(self) -> None:
        await self._started.wait()

    def silence(self) -> tuple[str, float]:
        """The least recently progressing component and seconds since its last progress.

        A context with children is judged by its children only (the parent's
        own body usually just awaits them).
        """
        if not self._children:
            return self.name, max(0.0, self._clock() - self._last_progress)
        return max((c.silence() for c in self._children.values()), key=lambda item: item[1])


Worker = Callable[[WorkerContext], Coroutine[Any, Any, None]]
"""A component's body: ``async def run(ctx) -> None`` (see the module docstring)."""


async def run_children(ctx: WorkerContext, workers: Mapping[str, Worker]) -> None:
    """Run ``workers`` together, each under ``ctx.child(name)``, until ``ctx.stopping``.

    ``ctx.started()`` is called once every child has started. A child that
    fails ends the others and the error propagates unwrapped (a single
    failure is raised as itself, not inside an ``ExceptionGroup``); a child
    that returns while not stopping raises :class:`WorkerExited`.
    """
    if not workers:
        raise ValueError("run_children needs at least one worker")
    children = {name: ctx.child(name) for name in workers}

    async def supervised(name: str, worker: Worker) -> None:
        await worker(children[name])
        if not ctx.stopping.is_set():
            raise WorkerExited(f"{children[name].name} returned while it should be running")

    async def all_started() -> None:
        for child in children.values():
            await child.wait_started()
        ctx.started()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(supervised(n, w), name=children[n].name) for n, w in workers.items()]
            readiness = group.create_task(all_started(), name=f"{ctx.name}.started")
            await asyncio.wait(tasks)  # every child returned (stopping) or one failed (group cancels)
            readiness.cancel()
    except BaseExceptionGroup as failure:
        raise unwrap(failure) from None


def unwrap(error: BaseException) -> BaseException:
    """The single real error inside nested one-member exception groups (else ``error`` itself)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


@asynccontextmanager
async def running(
    worker: Worker, name: str, *, start_timeout_s: float | None = 30.0
) -> AsyncIterator[WorkerContext]:
    """Run ``worker`` in an owned task for the ``async with`` body; stop it on exit.

    Entering waits until the worker has started; a worker that fails or
    returns first raises its error here, one that is not started within
    ``start_timeout_s`` raises ``TimeoutError``. Leaving sets ``stopping`` and
    waits for the worker to return (a failure is re-raised).
    """
    ctx = WorkerContext(name)
    task = asyncio.create_task(worker(ctx), name=name)
    try:
        started = asyncio.ensure_future(ctx.wait_started())
        try:
            await asyncio.wait({task, started}, timeout=start_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            started.cancel()
        if task.done():
            task.result()  # raises the worker's error, if any
            raise WorkerExited(f"{name} returned before it started")
        if not ctx.is_started:
            raise TimeoutError(f"{name} did not start within {start_timeout_s}s")
        yield ctx
    finally:
        ctx.stopping.set()
        if not ctx.is_started:
            task.cancel()  # never started: nothing to drain
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():  # we were cancelled ourselves: take the worker down with us
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise
