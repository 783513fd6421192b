"""The service's one periodic-loop shape: a worker that ticks every interval until stopping.

Built on ``ctx.wait_stopping`` (an event wait with a timeout), so shutdown
ends the wait at once and nothing polls. Progress is reported after every
tick and after every wait, so the watchdog sees a tick that hangs (set the
worker's heartbeat timeout above ``interval_s`` plus the longest healthy
tick); a tick that wants to show progress within itself is handed the
context.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from esper.core.worker import WorkerContext

Tick = Callable[[WorkerContext], Awaitable[None]]


async def run_every(ctx: WorkerContext, interval_s: float, tick: Tick, *, immediately: bool = True) -> None:
    """Call ``tick(ctx)`` every ``interval_s`` seconds (first at once unless ``immediately`` is false)."""
    ctx.started()
    if not immediately and await ctx.wait_stopping(interval_s):
        return
    while not ctx.stopping.is_set():
        await tick(ctx)
        ctx.progress()
        if await ctx.wait_stopping(interval_s):
            return
        ctx.progress()
