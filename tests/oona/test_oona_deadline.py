"""The handler deadline: one lazily re-armed timer for handlers run one after another in a task."""

from __future__ import annotations

import asyncio

import pytest

from esper.oona.deadline import HandlerDeadline

TIMEOUT_S = 0.2


async def test_a_body_that_overruns_ends_in_timeout_error() -> None:
    deadline = HandlerDeadline(TIMEOUT_S)
    never = asyncio.Event()
    with pytest.raises(TimeoutError):
        async with deadline:
            await never.wait()
    assert deadline.expired()
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # its cancellation was taken back
    deadline.close()


async def test_a_body_after_an_idle_spell_longer_than_the_timeout_still_times_out() -> None:
    deadline = HandlerDeadline(TIMEOUT_S)
    async with deadline:
        pass
    fired = asyncio.Event()
    asyncio.get_running_loop().call_later(TIMEOUT_S * 2, fired.set)
    await fired.wait()  # the timer armed above has fired meanwhile, with no body running
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.Event().wait()
    deadline.close()


def test_a_deadline_left_armed_by_an_ended_event_loop_still_works_in_the_next() -> None:
    deadline = HandlerDeadline(TIMEOUT_S)

    async def quick() -> None:
        async with deadline:
            pass  # leaves a timer scheduled on this loop, which then ends

    async def hangs() -> bool:
        try:
            async with deadline:
                await asyncio.Event().wait()
        except TimeoutError:
            return True
        return False

    asyncio.run(quick())
    assert asyncio.run(asyncio.wait_for(hangs(), 10 * TIMEOUT_S))
    deadline.close()


async def test_each_body_gets_its_full_time_though_the_timer_was_armed_for_an_earlier_one() -> None:
    timeout_s = 1.0  # wide margins: a busy machine may run the loop late
    deadline = HandlerDeadline(timeout_s)
    async with deadline:
        pass  # arms the timer for this body's due time, then finishes at once
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    # The next body starts half a timeout later and takes three quarters of one: the timer armed
    # for the first body fires while it runs and must re-arm for it instead of cancelling it.
    await asyncio.sleep(timeout_s / 2)
    async with deadline:
        loop.call_later(timeout_s * 0.75, done.set)
        await done.wait()
    assert not deadline.expired()
    never = asyncio.Event()
    with pytest.raises(TimeoutError):  # and a later body that hangs still times out
        async with deadline:
            await never.wait()
    deadline.close()


async def test_a_cancellation_from_elsewhere_is_not_taken_for_a_timeout() -> None:
    deadline = HandlerDeadline(60.0)
    entered = asyncio.Event()

    async def body() -> None:
        async with deadline:
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(body())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not deadline.expired()
    deadline.close()


async def test_a_deadline_is_reusable_after_it_expired_and_refuses_nested_use() -> None:
    deadline = HandlerDeadline(TIMEOUT_S)
    with pytest.raises(TimeoutError):
        async with deadline:
            await asyncio.Event().wait()
    async with deadline:
        with pytest.raises(RuntimeError, match="already in use"):
            async with deadline:
                pass
    assert not deadline.expired()
    deadline.close()
