"""The worker contract: readiness, per-component progress, stopping and error unwrapping."""

from __future__ import annotations

import asyncio

import pytest

from esper.core.worker import WorkerContext, WorkerExited, run_children, running, unwrap


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def serve_until_stopped(ctx: WorkerContext) -> None:
    ctx.started()
    await ctx.stopping.wait()


async def test_run_children_is_started_only_when_every_child_is() -> None:
    release = asyncio.Event()

    async def slow(ctx: WorkerContext) -> None:
        await release.wait()
        ctx.started()
        await ctx.stopping.wait()

    ctx = WorkerContext("w")
    task = asyncio.create_task(run_children(ctx, {"fast": serve_until_stopped, "slow": slow}))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not ctx.is_started
    release.set()
    await asyncio.wait_for(ctx.wait_started(), 2)
    ctx.stopping.set()
    await asyncio.wait_for(task, 2)


async def test_a_failing_child_raises_its_own_error_not_a_group() -> None:
    async def broken(ctx: WorkerContext) -> None:
        ctx.started()
        raise KeyError("boom")

    ctx = WorkerContext("w")
    with pytest.raises(KeyError, match="boom"):
        await asyncio.wait_for(run_children(ctx, {"ok": serve_until_stopped, "bad": broken}), 2)


async def test_a_child_returning_early_is_an_error() -> None:
    async def quits(ctx: WorkerContext) -> None:
        ctx.started()

    ctx = WorkerContext("w")
    with pytest.raises(WorkerExited, match=r"w\.quits"):
        await asyncio.wait_for(run_children(ctx, {"ok": serve_until_stopped, "quits": quits}), 2)


def test_silence_names_the_least_recently_progressing_component() -> None:
    clock = FakeClock()
    ctx = WorkerContext("w", clock=clock)
    idle, wedged = ctx.child("idle"), ctx.child("wedged")
    clock.now += 10
    idle.progress()
    assert ctx.silence() == ("w.wedged", 10.0)
    wedged.progress()
    clock.now += 3
    assert ctx.silence()[1] == 3.0
    # A worker without children is judged by its own progress.
    alone = WorkerContext("alone", clock=clock)
    clock.now += 4
    assert alone.silence() == ("alone", 4.0)


async def test_wait_stopping_returns_false_on_timeout_and_true_once_set() -> None:
    ctx = WorkerContext("w")
    assert await ctx.wait_stopping(0.01) is False
    ctx.stopping.set()
    assert await ctx.wait_stopping(5) is True


async def test_running_yields_after_start_and_stops_the_worker_on_exit() -> None:
    stopped = asyncio.Event()

    async def worker(ctx: WorkerContext) -> None:
        ctx.started()
        await ctx.stopping.wait()
        stopped.set()

    async with running(worker, "svc") as ctx:
        assert ctx.is_started
        assert not stopped.is_set()
    assert stopped.is_set()


async def test_running_raises_the_error_of_a_worker_that_fails_before_starting() -> None:
    async def fails(ctx: WorkerContext) -> None:
        raise OSError("port busy")

    with pytest.raises(OSError, match="port busy"):
        async with running(fails, "svc"):
            pytest.fail("must not enter")


async def test_running_gives_up_on_a_worker_that_never_starts() -> None:
    cancelled = asyncio.Event()

    async def never(ctx: WorkerContext) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    with pytest.raises(TimeoutError, match="did not start"):
        async with running(never, "svc", start_timeout_s=0.05):
            pytest.fail("must not enter")
    assert cancelled.is_set()


def test_unwrap_peels_single_member_groups_only() -> None:
    inner = ValueError("x")
    assert unwrap(ExceptionGroup("g", [ExceptionGroup("h", [inner])])) is inner
    two = ExceptionGroup("g", [ValueError("a"), KeyError("b")])
    assert unwrap(two) is two
