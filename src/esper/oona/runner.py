"""``run_consumers``: the body every bus service runs around its consumers.

Kasmina's command intake and prefetch coordinator and Tamiyo's service all
do the same thing while running: start their consumers as tasks of one
``TaskGroup``, wait until the broadcast readers are positioned (so nothing
published from then on is missed), report ready, tick until a stop event is
set, then stop the consumers so their batches in flight finish and are
acked. Keeping that in one place keeps the structured-concurrency guarantees
(every task owned and awaited, a failing consumer ends the run with its
error for the supervisor to restart) identical across services.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence

from esper.core.tasks import wait_first
from esper.oona.broadcast_consumer import BroadcastConsumer
from esper.oona.group_consumer import GroupConsumer


async def run_consumers(
    consumers: Mapping[str, GroupConsumer | BroadcastConsumer],
    stops: Sequence[asyncio.Event],
    *,
    on_ready: Callable[[], None] | None = None,
    tick_s: float | None = None,
    on_tick: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run ``consumers`` (task name -> consumer) until any of ``stops`` is set, then stop them.

    ``on_ready`` is called once every broadcast reader has its start id
    (group consumers need nothing: their group already exists). With
    ``tick_s``, ``on_tick`` is awaited every ``tick_s`` seconds while no stop
    event is set (waiting on the events, never sleep-polling).
    """
    async with asyncio.TaskGroup() as group:
        for name, consumer in consumers.items():
            group.create_task(consumer.run(), name=name)
        for consumer in consumers.values():
            if isinstance(consumer, BroadcastConsumer):
                await consumer.ready.wait()
        if on_ready is not None:
            on_ready()
        while not await wait_first(*stops, limit_s=tick_s):
            if on_tick is not None:
                await on_tick()
        for consumer in consumers.values():
            await consumer.stop()
