"""Supervisor behaviour with real asyncio tasks: boot, restart, watchdog, shutdown.

Workers follow the one contract (``esper.core.worker``): up only after
``ctx.started()``, alive while ``ctx.progress()`` is called.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from esper.core.worker import WorkerContext, run_children
from esper.weatherlight import (
    BackoffPolicy,
    BootError,
    RestartPolicy,
    Supervisor,
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
    ctx.started()
    await ctx.stopping.wait()


def failing(counter: list[int], message: str = "boom") -> Factory:
    async def run(ctx: WorkerContext) -> None:
        counter.append(1)
        ctx.started()
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
            ctx.started()
            await ctx.stopping.wait()

        return run

    sup = Supervisor(FAST)
    await sup.start([WorkerSpec(n, worker(n)) for n in ("oona", "urza", "kasmina")])
    assert events == [
        "start:oona",
        "ready:oona",
        "start:urza",
        "ready:urza",
        "start:kasmina",
        "ready:kasmina",
    ]
    assert sup.snapshot()["booted"] is True
    assert {w["status"] for w in sup.snapshot()["workers"]} == {"running"}
    result = await sup.shutdown(5)
    assert result.clean
    assert result.exit_code == 0
    assert sup.snapshot()["stopping"] is True


async def test_failing_boot_step_aborts_and_stops_started_workers() -> None:
    stopped: list[str] = []
    started: list[str] = []

    async def good(ctx: WorkerContext) -> None:
        started.append(ctx.name)
        ctx.started()
        try:
            await ctx.stopping.wait()
        finally:
            stopped.append(ctx.name)

    async def bad(ctx: WorkerContext) -> None:
        started.append(ctx.name)
        raise ConnectionError("redis unreachable")

    sup = Supervisor(FAST)
    # TEMPORARY: a failed attempt is not retried, so the boot fails at once.
    specs = [WorkerSpec("a", good), WorkerSpec("b", bad, RestartPolicy.TEMPORARY), WorkerSpec("c", good)]
    with pytest.raises(BootError, match="redis unreachable"):
        await sup.start(specs)
    assert started == ["a", "b"]
    assert stopped == ["a"]
    assert sup.result is not None
    assert sup.result.exit_code != 0


async def test_a_worker_is_up_only_once_it_calls_started() -> None:
    """No implicit readiness: running for a while without ``ctx.started()`` is not being up."""
    steps: list[int] = []

    async def never_started(ctx: WorkerContext) -> None:
        while not ctx.stopping.is_set():
            steps.append(1)
            ctx.progress()
            await ctx.wait_stopping(0.01)

    sup = Supervisor(FAST)
    with pytest.raises(BootError, match=r"slow: not up within 0\.2s"):
        await sup.start([WorkerSpec("slow", never_started, ready_timeout_s=0.2)])
    assert len(steps) > 3  # it ran, busily, and still did not count as up


async def test_boot_step_failing_twice_then_succeeding_boots() -> None:
    attempts: list[int] = []

    async def flaky_connect(ctx: WorkerContext) -> None:
        attempts.append(1)
        if len(attempts) <= 2:
            raise ConnectionError(f"catalogue not reachable yet (attempt {len(attempts)})")
        ctx.started()
        await ctx.stopping.wait()

    after: list[str] = []

    async def next_step(ctx: WorkerContext) -> None:
        after.append("started")
        ctx.started()
        await ctx.stopping.wait()

    sup = Supervisor(FAST)
    await sup.start(
        [WorkerSpec("catalog", flaky_connect, ready_timeout_s=5.0), WorkerSpec("next", next_step)]
    )
    assert len(attempts) == 3
    assert after == ["started"]
    view = sup.worker("catalog")
    assert view["status"] == "running"
    assert view["restarts"] == 2
    assert view["last_error"] == {
        "type": "ConnectionError",
        "message": "catalogue not reachable yet (attempt 2)",
    }
    assert len(sup.delays("catalog")) == 2
    await sup.shutdown(2)


async def test_boot_step_still_failing_at_its_ready_timeout_fails_boot_naming_the_last_error() -> None:
    async def port_taken(ctx: WorkerContext) -> None:
        raise OSError(98, "address already in use: 127.0.0.1:9101")

    sup = Supervisor(FAST)
    with pytest.raises(BootError, match=r"http: not up within 0.3s \(last error: OSError: .*127.0.0.1:9101"):
        await sup.start([WorkerSpec("http", port_taken, ready_timeout_s=0.3)])


async def test_one_shot_steps_complete_by_returning_but_a_permanent_worker_cannot() -> None:
    done: list[str] = []

    async def migrate(ctx: WorkerContext) -> None:
        done.append(ctx.name)  # returns without ctx.started(): a completed one-shot step

    sup = Supervisor(FAST)
    await sup.start(
        [
            WorkerSpec("migrate", migrate, RestartPolicy.TRANSIENT),
            WorkerSpec("seed", migrate, RestartPolicy.TEMPORARY),
            WorkerSpec("after", forever),
        ]
    )
    assert done == ["migrate", "seed"]
    assert sup.worker("migrate")["status"] == "stopped"
    assert sup.worker("migrate")["last_error"] is None
    await sup.shutdown(2)

    sup = Supervisor(FAST)
    with pytest.raises(BootError, match="not up within"):
        await sup.start([WorkerSpec("daemon", migrate, ready_timeout_s=0.3)])
    assert sup.worker("daemon")["last_error"]["type"] == "WorkerExited"


async def test_stop_requested_during_boot_aborts_boot() -> None:
    sup = Supervisor(FAST)

    async def stops_boot(ctx: WorkerContext) -> None:
        sup.request_stop("SIGTERM")
        ctx.started()
        await ctx.stopping.wait()

    with pytest.raises(BootError, match="SIGTERM"):
        await sup.start([WorkerSpec("a", stops_boot), WorkerSpec("b", forever)])
    assert [w["name"] for w in sup.snapshot()["workers"]] == ["a"]


async def test_restart_delays_follow_exponential_backoff() -> None:
    runs: list[int] = []
    sup = Supervisor(FAST)
    ok = asyncio.Event()

    async def boots_then_fails(ctx: WorkerContext) -> None:
        runs.append(1)
        ctx.started()
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
    assert info["last_error"] == {"type": "RuntimeError", "message": "boom"}
    assert info["last_error_ts"] is not None
    assert info["restarts"] >= 3
    await sup.shutdown(2)


async def test_backoff_caps_and_resets_after_a_stable_run() -> None:
    policy = BackoffPolicy(base_s=BASE, factor=2.0, cap_s=BASE * 2, jitter=0.0, stable_s=0.15)
    assert [policy.delay(n) for n in range(4)] == [BASE, BASE * 2, BASE * 2, BASE * 2]
    runs: list[int] = []

    async def flaky(ctx: WorkerContext) -> None:
        runs.append(1)
        ctx.started()
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
        ctx.started()
        if len(runs) == 1:
            await asyncio.sleep(0.01)
            raise RuntimeError("transient glitch")
        await ctx.stopping.wait()

    sup = Supervisor(BackoffPolicy(base_s=0.3, jitter=0.0))
    await sup.start([WorkerSpec("w", fails_once)])
    await until(lambda: sup.worker("w")["status"] == "backing_off")
    snap = sup.snapshot()
    assert snap["backing_off"] == 1
    assert snap["backoff_seconds"] == 0.3
    await until(lambda: sup.worker("w")["status"] == "running")
    snap = sup.snapshot()
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
            ctx.started()
            await asyncio.sleep(0.002)
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
    assert temp["last_error"] == {"type": "ValueError", "message": "temp_raise"}
    await sup.shutdown(2)


async def test_intensity_limit_fails_a_required_worker_and_the_supervisor() -> None:
    runs: list[int] = []
    sup = Supervisor(FAST)

    async def crashy(ctx: WorkerContext) -> None:
        runs.append(1)
        ctx.started()
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
    assert sup.failed_required() == ()
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
        ctx.started()
        await asyncio.Event().wait()  # never reports progress

    async def beats(ctx: WorkerContext) -> None:
        ctx.started()
        while not ctx.stopping.is_set():
            ctx.progress()
            await asyncio.sleep(0.01)

    sup = Supervisor(FAST)
    await sup.start(
        [
            WorkerSpec("hung", hangs, heartbeat_timeout_s=0.05, max_restarts=100),
            WorkerSpec("alive", beats, heartbeat_timeout_s=0.05),
        ]
    )
    await until(lambda: len(runs) >= 3)
    assert sup.worker("hung")["last_error"]["type"] == "WatchdogTimeout"
    assert sup.worker("alive")["restarts"] == 0
    assert sup.worker("alive")["status"] == "running"
    await sup.shutdown(2)


async def test_shutdown_stops_workers_in_reverse_boot_order() -> None:
    stopped: list[str] = []

    async def drains(ctx: WorkerContext) -> None:
        ctx.started()
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
        ctx.started()
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
        ctx.started()
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
        ctx.started()
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
        ctx.started()
        await ctx.stopping.wait()
        raise RuntimeError("flush failed while draining")

    await sup.start([WorkerSpec("w", slow_boot)])
    seen.append(sup.worker("w")["status"])
    assert seen == ["starting", "running"]
    result = await sup.shutdown(2)
    assert result.clean
    assert sup.worker("w")["status"] == "stopped"
    assert sup.worker("w")["last_error"] == {"type": "RuntimeError", "message": "flush failed while draining"}


async def test_watchdog_judges_each_component_a_wedged_one_next_to_an_idle_one_is_restarted() -> None:
    attempts: list[int] = []
    wedged = asyncio.Event()

    async def idle(ctx: WorkerContext) -> None:
        ctx.started()
        while not await ctx.wait_stopping(0.01):  # an idle read that times out still counts
            ctx.progress()

    async def handler(ctx: WorkerContext) -> None:
        ctx.started()
        if len(attempts) == 1:
            wedged.set()
            await asyncio.Event().wait()  # a handler stuck on its first message
        while not await ctx.wait_stopping(0.01):
            ctx.progress()

    async def worker(ctx: WorkerContext) -> None:
        attempts.append(1)
        await run_children(ctx, {"commands": idle, "catalog": handler})

    sup = Supervisor(FAST)
    with capture_logs() as logs:
        await sup.start([WorkerSpec("kasmina", worker, heartbeat_timeout_s=0.2)])
        await until(lambda: len(attempts) == 2 and sup.worker("kasmina")["status"] == "running")
    error = sup.worker("kasmina")["last_error"]
    assert error["type"] == "WatchdogTimeout"
    assert error["message"].startswith("kasmina.catalog made no progress")
    silent = [e for e in logs if e["event"].startswith("watchdog")]
    assert [e["component"] for e in silent] == ["kasmina.catalog"]
    await sup.shutdown(2)


async def test_an_abandoned_attempt_cannot_keep_its_successor_alive() -> None:
    """Each attempt has its own context: the old one's progress is not the new one's."""
    attempts: list[WorkerContext] = []
    release = asyncio.Event()

    async def hangs_then_ignores_cancellation(ctx: WorkerContext) -> None:
        attempts.append(ctx)
        ctx.started()
        if len(attempts) == 1:
            while not release.is_set():  # deaf to cancellation, and busily reporting progress
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(0.005)
                if len(attempts) > 1:
                    ctx.progress()
            return
        await asyncio.Event().wait()  # the successor hangs

    sup = Supervisor(FAST)
    first = WorkerSpec("w", hangs_then_ignores_cancellation, heartbeat_timeout_s=0.1, grace_s=0.05)
    await sup.start([first])
    await until(lambda: len(attempts) >= 3)  # the hung successor was restarted despite the old one's beats
    assert attempts[0] is not attempts[1]
    assert len(sup.abandoned) >= 1
    release.set()
    await sup.shutdown(2)
    if sup.abandoned:
        await asyncio.wait(sup.abandoned, timeout=2)


async def test_a_failure_inside_a_task_group_is_recorded_and_logged_as_itself_with_its_traceback() -> None:
    async def component(ctx: WorkerContext) -> None:
        ctx.started()
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(10))
            group.create_task(_explode())

    sup = Supervisor(BackoffPolicy(base_s=5.0, jitter=0.0))
    with capture_logs() as logs:
        await sup.start([WorkerSpec("oona", component)])
        await until(lambda: sup.worker("oona")["status"] == "backing_off")
    assert sup.worker("oona")["last_error"] == {
        "type": "KeyError",
        "message": "'kernel-42'",
    }
    failed = next(e for e in logs if e["event"] == "worker failed")
    assert failed["error"] == "KeyError: 'kernel-42'"
    error = failed["exc_info"]
    assert isinstance(error, KeyError)
    frames = [frame.name for frame in traceback.extract_tb(error.__traceback__)]
    assert "_explode" in frames  # the real traceback, not the group's
    await sup.shutdown(2)


async def _explode() -> None:
    await asyncio.sleep(0)
    raise KeyError("kernel-42")


async def test_a_secret_in_an_error_message_is_masked() -> None:
    async def leaky(ctx: WorkerContext) -> None:
        raise ConnectionError("cannot reach redis://:hunter2@10.0.0.5:6379/0")

    sup = Supervisor(FAST)
    with pytest.raises(BootError) as raised:
        await sup.start([WorkerSpec("oona", leaky, RestartPolicy.TEMPORARY)])
    assert "hunter2" not in str(raised.value)
    assert sup.worker("oona")["last_error"]["message"] == "cannot reach redis://:***@10.0.0.5:6379/0"
