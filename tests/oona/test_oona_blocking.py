"""Abandoning a parked read on stop, including when the first cancellation is lost.

On Python 3.11 redis-py's write (``asyncio.wait_for`` around the drain) can
swallow a cancellation that lands while the command is being written; the
read then parks for its whole block time. ``_SwallowsOnce`` reproduces that
exactly: it eats the first cancellation and parks again.
"""

from __future__ import annotations

import asyncio

import pytest

from esper.oona.blocking import BlockingRead

PARK_S = 30.0


class _SwallowsOnce:
    def __init__(self, then_park_s: float = PARK_S) -> None:
        self.parked = asyncio.Event()
        self.swallowed = 0
        self.then_park_s = then_park_s

    async def __call__(self) -> list[str]:
        self.parked.set()
        try:
            await asyncio.sleep(PARK_S)
        except asyncio.CancelledError:
            self.swallowed += 1  # lost, as inside wait_for when the write had just finished
        await asyncio.sleep(self.then_park_s)
        return ["entries"]


async def _read_in_task(reader: BlockingRead, call: _SwallowsOnce) -> tuple[object, int]:
    result = await reader.read(call)
    task = asyncio.current_task()
    assert task is not None
    return result, task.cancelling()


async def test_a_stop_ends_a_read_whose_first_cancellation_was_swallowed() -> None:
    reader, call, stopping = BlockingRead(), _SwallowsOnce(), asyncio.Event()
    async with asyncio.timeout(5):  # far below PARK_S: without asking again this would hang
        async with asyncio.TaskGroup() as group:
            read = group.create_task(_read_in_task(reader, call))
            group.create_task(reader.abandon_when(stopping))
            await call.parked.wait()
            stopping.set()
    assert call.swallowed == 1
    result, cancelling = read.result()
    assert result is None
    assert cancelling == 0  # every cancellation the reader made was taken back
    assert await reader.read(call) is None  # and no read starts after a stop


async def test_entries_read_after_a_swallowed_cancellation_are_returned_and_the_task_is_clean() -> None:
    """The read ends by itself (entries arrived) before the stop asks again: nothing is dropped."""
    reader, call, stopping = BlockingRead(), _SwallowsOnce(then_park_s=0), asyncio.Event()
    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        read = group.create_task(_read_in_task(reader, call))
        group.create_task(reader.abandon_when(stopping))
        await call.parked.wait()
        stopping.set()
    assert call.swallowed == 1
    assert read.result() == (["entries"], 0)


async def test_a_stop_ends_a_plain_parked_read_and_the_task_carries_on() -> None:
    reader, stopping = BlockingRead(), asyncio.Event()
    parked = asyncio.Event()

    async def park() -> None:
        parked.set()
        await asyncio.sleep(PARK_S)

    async def reader_task() -> str:
        assert await reader.read(park) is None
        await asyncio.sleep(0)  # not cancelled any more: the task goes on with its work
        return "went on"

    async with asyncio.timeout(5), asyncio.TaskGroup() as group:
        task = group.create_task(reader_task())
        group.create_task(reader.abandon_when(stopping))
        await parked.wait()
        stopping.set()
    assert task.result() == "went on"


async def test_a_cancellation_from_elsewhere_is_not_taken_back() -> None:
    reader = BlockingRead()
    parked = asyncio.Event()

    async def park() -> None:
        parked.set()
        await asyncio.sleep(PARK_S)

    task = asyncio.create_task(reader.read(park))
    await parked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
