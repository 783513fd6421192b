"""Supervisor behaviour with real asyncio tasks: boot, restart, watchdog, shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from esper.weatherlight.supervisor import (
    BackoffPolicy,
    BootError,
    RestartPolicy,
    Supervisor,
    WorkerContext,
    WorkerSpec,
    WorkerStatus,
)

BASE = 0.02
FAST = BackoffPolicy(base_s=BASE, factor=2.0, cap_s=5.0, jitter=0.1, stable_s=60.0)
Factory = Callable[[WorkerContext], Awaitable[None]]


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait for a condition driven by the supervisor (generous bound: 'does not hang')."""
    end = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


async def forever(ctx: WorkerContext) -> None:
    await ctx.stopping.wait()


def failing(counter: list[int], message: str = "boom") -> Factory:
    async def run(ctx: WorkerContext) -> None:
        counter.append(1)
        await asyncio.sleep(0.002)
        raise RuntimeError(message)

    return run


async def test_boot_is_sequential_and_gated_by_readiness() -> None:
    events: list[str] = []

    def worker(name: str) -> Factory:
        async def run(ctx: WorkerContext) -> None:
            events.append(f"start:{name}")
            await asyncio.sleep(0.01)
            events.append(f"ready:{name}")
            ctx.mark_ready()
            await ctx.stopping.wait()

        return run

    sup = Supervisor(FAST)
    await sup.start([WorkerSpec(n, worker(n), wait_ready=True) for n in ("oona", "urza", "kasmina")])
    assert events == [
        "start:oona",
        "ready:oona",
        "start:urza",
        "ready:urza",
        "start:kasmina",
        "ready:kasmina",
    ]
    assert sup.snapshot()["ready"] is True
    assert (await sup.readiness_check())[0] is True
    result = await sup.shutdown(5)
    assert result.clean
    assert result.exit_code == 0
    assert (await sup.readiness_check()) == (False, "stopping")


async def test_failing_boot_step_aborts_and_stops_started_workers() -> None:
    stopped: list[str] = []
    started: list[str] = []

    async def good(ctx: WorkerContext) -> None:
        started.append(ctx.name)
        try:
            await ctx.stopping.wait()
        finally:
            stopped.append(ctx.name)

    async def bad(ctx: WorkerContext) -> None:
        started.append(ctx.name)
        raise ConnectionError("redis unreachable")

    sup = Supervisor(FAST)
    specs = [WorkerSpec("a", good), WorkerSpec("b", bad), WorkerSpec("c", good)]
    with pytest.raises(BootError, match="redis unreachable"):
        await sup.start(specs)
    assert started == ["a", "b"]
    assert stopped == ["a"]
    assert sup.result is not None
    assert sup.result.exit_code != 0


async def test_boot_step_not_ready_in_time_aborts() -> None:
    async def never_ready(ctx: WorkerContext) -> None:
        await ctx.stopping.wait()

    sup = Supervisor(FAST)
    with pytest.raises(BootError, match="not ready"):
        await sup.start([WorkerSpec("slow", never_ready, wait_ready=True, ready_timeout_s=0.05)])


async def test_stop_requested_during_boot_aborts_boot() -> None:
    sup = Supervisor(FAST)

    async def stops_boot(ctx: WorkerContext) -> None:
        sup.request_stop("SIGTERM")
        await ctx.stopping.wait()

    with pytest.raises(BootError, match="SIGTERM"):
        await sup.start([WorkerSpec("a", stops_boot, wait_ready=True), WorkerSpec("b", forever)])
    assert [w["name"] for w in sup.snapshot()["workers"]] == ["a"]


async def test_restart_delays_follow_exponential_backoff() -> None:
    runs: list[int] = []
    sup = Supervisor(FAST)
    ok = asyncio.Event()

    async def boots_then_fails(ctx: WorkerContext) -> None:
        runs.append(1)
        if len(runs) == 1:
            ok.set()
            await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    await sup.start([WorkerSpec("w", boots_then_fails, max_restarts=10)])
    await until(lambda: len(sup.delays("w")) >= 4)
    for n, delay in enumerate(sup.delays("w")[:4]):
        expected = BASE * 2**n
        assert expected * 0.9 - 1e-9 <= delay <= expected * 1.1 + 1e-9, (n, delay)
    info = sup.worker("w")
    assert info["last_error"] == "RuntimeError: boom"
    assert info["last_error_ts"] is not None
    assert info["restarts"] >= 3
    await sup.shutdown(2)


async def test_backoff_caps_and_resets_after_a_stable_run() -> None:
    policy = BackoffPolicy(base_s=BASE, factor=2.0, cap_s=BASE * 2, jitter=0.0, stable_s=0.15)
    assert [policy.delay(n) for n in range(4)] == [BASE, BASE * 2, BASE * 2, BASE * 2]
    runs: list[int] = []

    async def flaky(ctx: WorkerContext) -> None:
        runs.append(1)
        if len(runs) == 3:  # the third attempt is stable for a while, then fails again
            await asyncio.sleep(0.2)
        elif len(runs) >= 5:
            await ctx.stopping.wait()
            return
        await asyncio.sleep(0.005)  # get past boot's first step
        raise RuntimeError("flaky")

    sup = Supervisor(BackoffPolicy(base_s=BASE, jitter=0.0, stable_s=0.15))
    await sup.start([WorkerSpec("w", flaky, max_restarts=10)])
    await until(lambda: len(runs) >= 5 and sup.worker("w")["status"] == "running")
    assert sup.delays("w") == pytest.approx([BASE, BASE * 2, BASE, BASE * 2])
    await sup.shutdown(2)


async def test_health_is_degraded_while_backing_off_and_recovers() -> None:
    runs: list[int] = []

    async def fails_once(ctx: WorkerContext) -> None:
        runs.append(1)
        if len(runs) == 1:
            await asyncio.sleep(0.01)
            raise RuntimeError("transient glitch")
        await ctx.stopping.wait()

    sup = Supervisor(BackoffPolicy(base_s=0.3, jitter=0.0))
    await sup.start([WorkerSpec("w", fails_once)])
    await until(lambda: sup.worker("w")["status"] == "backing_off")
    snap = sup.snapshot()
    assert snap["healthy"] is False
    assert snap["backing_off"] == 1
    assert snap["backoff_seconds"] == 0.3
    await until(lambda: sup.worker("w")["status"] == "running")
    snap = sup.snapshot()
    assert snap["healthy"] is True
    assert snap["backing_off"] == 0
    assert snap["last_error_ts"] is not None
    assert snap["restarts_total"] == 1
    assert snap["task_count"] == 1
    await sup.shutdown(2)


async def test_restart_policies() -> None:
    counts: dict[str, int] = {}

    def returns(name: str, raise_error: bool) -> Factory:
        async def run(ctx: WorkerContext) -> None:
            counts[name] = counts.get(name, 0) + 1
            await asyncio.sleep(0.002)  # failing on the very first step would be a boot failure
            if raise_error:
                raise ValueError(name)

        return run

    sup = Supervisor(FAST)
    await sup.start(
        [
            WorkerSpec("perm_clean", returns("perm_clean", False), max_restarts=100),
            WorkerSpec("trans_clean", returns("trans_clean", False), RestartPolicy.TRANSIENT),
            WorkerSpec(
                "trans_raise", returns("trans_raise", True), RestartPolicy.TRANSIENT, max_restarts=100
            ),
            WorkerSpec("temp_raise", returns("temp_raise", True), RestartPolicy.TEMPORARY, required=False),
        ]
    )
    await until(lambda: counts.get("perm_clean", 0) >= 3 and counts.get("trans_raise", 0) >= 3)
    assert counts["trans_clean"] == 1
    assert counts["temp_raise"] == 1
    assert sup.worker("trans_clean")["status"] == WorkerStatus.STOPPED
    temp = sup.worker("temp_raise")
    assert temp["status"] == WorkerStatus.STOPPED
    assert temp["last_error"] == "ValueError: temp_raise"
    await sup.shutdown(2)


async def test_intensity_limit_fails_a_required_worker_and_the_supervisor() -> None:
    runs: list[int] = []
    sup = Supervisor(FAST)

    async def crashy(ctx: WorkerContext) -> None:
        runs.append(1)
        await asyncio.sleep(0.005)
        raise RuntimeError("crash loop")

    specs = [WorkerSpec("steady", forever), WorkerSpec("crashy", crashy, max_restarts=2)]
    result = await asyncio.wait_for(sup.run(specs, shutdown_deadline_s=2), 10)
    assert result.failed_required == ("crashy",)
    assert result.exit_code == 1
    assert len(runs) == 3
    assert sup.worker("crashy")["status"] == "failed"
    assert sup.worker("steady")["status"] == "stopped"


async def test_intensity_limit_on_an_optional_worker_keeps_running() -> None:
    sup = Supervisor(FAST)
    runs: list[int] = []
    await sup.start(
        [WorkerSpec("steady", forever), WorkerSpec("opt", failing(runs), required=False, max_restarts=1)]
    )
    await until(lambda: sup.worker("opt")["status"] == "failed")
    snap = sup.snapshot()
    assert snap["failed"] == 1
    assert snap["healthy"] is False
    assert snap["ready"] is True
    waiter = asyncio.create_task(sup.wait())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    sup.request_stop("test over")
    assert await waiter == "test over"
    result = await sup.shutdown(2)
    assert result.exit_code == 0
    assert result.failed_required == ()


async def test_watchdog_restarts_a_hung_worker() -> None:
    runs: list[int] = []

    async def hangs(ctx: WorkerContext) -> None:
        runs.append(1)
        await asyncio.Event().wait()  # never heartbeats

    async def beats(ctx: WorkerContext) -> None:
        while not ctx.stopping.is_set():
            ctx.heartbeat()
            await asyncio.sleep(0.01)

    sup = Supervisor(FAST)
    await sup.start(
        [
            WorkerSpec("hung", hangs, heartbeat_timeout_s=0.05, max_restarts=100),
            WorkerSpec("alive", beats, heartbeat_timeout_s=0.05),
        ]
    )
    await until(lambda: len(runs) >= 3)
    assert "watchdog timeout" in (sup.worker("hung")["last_error"] or "")
    assert sup.worker("alive")["restarts"] == 0
    assert sup.worker("alive")["status"] == "running"
    await sup.shutdown(2)


async def test_shutdown_stops_workers_in_reverse_boot_order() -> None:
    stopped: list[str] = []

    async def drains(ctx: WorkerContext) -> None:
        await ctx.stopping.wait()
        await asyncio.sleep(0.01)  # a drain step, still within grace
        stopped.append(ctx.name)

    sup = Supervisor(FAST)
    await sup.start([WorkerSpec(n, drains) for n in ("redis", "oona", "urza", "tamiyo")])
    result = await sup.shutdown(5)
    assert stopped == ["tamiyo", "urza", "oona", "redis"]
    assert result.clean
    assert not result.deadline_hit
    assert result.stragglers == ()
    assert all(w["status"] == "stopped" for w in sup.snapshot()["workers"])


async def test_worker_ignoring_stop_signal_is_cancelled_after_grace() -> None:
    cancelled: list[str] = []

    async def ignores_stopping(ctx: WorkerContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.name)
            raise

    sup = Supervisor(FAST)
    await sup.start([WorkerSpec("stubborn", ignores_stopping, grace_s=0.05)])
    result = await sup.shutdown(5)
    assert cancelled == ["stubborn"]
    assert result.clean


def deaf_worker(release: asyncio.Event) -> Factory:
    async def run(ctx: WorkerContext) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # deliberately swallows cancellation until the test releases it

    return run


@pytest.mark.parametrize(("grace_s", "deadline_s"), [(5.0, 0.3), (0.05, 2.0)])
async def test_worker_ignoring_cancellation_cannot_hang_shutdown(grace_s: float, deadline_s: float) -> None:
    release = asyncio.Event()
    stopped: list[str] = []

    async def polite(ctx: WorkerContext) -> None:
        await ctx.stopping.wait()
        stopped.append(ctx.name)

    sup = Supervisor(FAST)
    await sup.start([WorkerSpec("first", polite), WorkerSpec("deaf", deaf_worker(release), grace_s=grace_s)])
    began = time.monotonic()
    result = await sup.shutdown(deadline_s)
    assert time.monotonic() - began < deadline_s + 0.5
    assert result.stragglers == ("deaf",)
    assert not result.clean
    assert result.exit_code == 1
    assert result.deadline_hit is (grace_s > deadline_s)
    assert stopped == ["first"]  # the straggler did not stop the others from stopping
    assert len(sup.abandoned) == 1
    release.set()
    await asyncio.wait(sup.abandoned)


async def test_duplicate_names_are_rejected() -> None:
    sup = Supervisor(FAST)
    with pytest.raises(ValueError, match="duplicate"):
        await sup.start([WorkerSpec("a", forever), WorkerSpec("a", forever)])
    await sup.shutdown(1)


async def test_status_is_starting_until_ready_and_drain_errors_are_recorded() -> None:
    sup = Supervisor(FAST)
    seen: list[str] = []

    async def slow_boot(ctx: WorkerContext) -> None:
        await asyncio.sleep(0.01)
        seen.append(sup.worker(ctx.name)["status"])
        ctx.mark_ready()
        seen.append(sup.worker(ctx.name)["status"])
        await ctx.stopping.wait()
        raise RuntimeError("flush failed while draining")

    await sup.start([WorkerSpec("w", slow_boot, wait_ready=True)])
    assert seen == ["starting", "running"]
    result = await sup.shutdown(2)
    assert result.clean
    assert sup.worker("w")["status"] == "stopped"
    assert sup.worker("w")["last_error"] == "RuntimeError: flush failed while draining"
