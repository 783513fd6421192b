"""Worker bodies shared by the service: run components as supervised workers.

Each body has the shape the supervisor expects (``async def body(ctx)``),
marks itself ready once its component is running, heartbeats only while the
component makes progress (so the watchdog restarts a stuck one), and drains
its component when ``ctx.stopping`` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from esper.weatherlight.supervisor import WorkerContext


class Runnable(Protocol):
    """A component with an owned ``run()`` loop and a graceful ``stop()``."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


class _Progressing(Protocol):
    iterations: int


async def run_components(
    ctx: WorkerContext,
    components: Sequence[Runnable],
    *,
    progress: Sequence[_Progressing] = (),
    heartbeat_every_s: float = 1.0,
) -> None:
    """Run ``components`` until one ends (an error restarts the worker) or ``ctx.stopping``.

    With ``progress`` given, a heartbeat is sent only when some loop advanced
    since the last one; otherwise heartbeats follow the event loop.
    """
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c.run()) for c in components]
        stopping = group.create_task(ctx.stopping.wait())
        ctx.mark_ready()
        last = [p.iterations for p in progress]
        while True:
            done, _ = await asyncio.wait(
                [*tasks, stopping], timeout=heartbeat_every_s, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                for component in components:
                    await component.stop()
                return
            if done:
                # A component ended on its own: surface its error (if any) to the supervisor.
                stopping.cancel()
                for task in done:
                    task.result()
                raise RuntimeError("a component returned while it should be running")
            now = [p.iterations for p in progress]
            if not progress or now != last:
                ctx.heartbeat()
            last = now


async def run_periodically(
    ctx: WorkerContext,
    interval_s: float,
    tick: Callable[[], Awaitable[None]],
    *,
    immediately: bool = True,
) -> None:
    """Call ``tick`` every ``interval_s`` until stopping; each tick heartbeats the watchdog."""
    ctx.mark_ready()
    ctx.heartbeat()
    if not immediately:
        await _wait_or_stop(ctx, interval_s)
    while not ctx.stopping.is_set():
        await tick()
        ctx.heartbeat()
        await _wait_or_stop(ctx, interval_s)


async def _wait_or_stop(ctx: WorkerContext, seconds: float) -> None:
    try:
        await asyncio.wait_for(ctx.stopping.wait(), seconds)
    except TimeoutError:
        return


async def run_once(ctx: WorkerContext, step: Callable[[], Awaitable[None]]) -> None:
    """A one-shot boot step: do it, then report ready by returning."""
    await step()
    ctx.mark_ready()
