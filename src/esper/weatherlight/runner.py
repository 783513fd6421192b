"""One worker's life under the supervisor: attempts, the watchdog, restart decisions, backoff.

Why a runner per worker: everything that decides whether *this* worker runs
again (its attempts, its restart intensity, its backoff schedule, its last
error) belongs to it alone, so the supervisor above only orders boot and
shutdown and reads each runner's state. Each attempt gets a fresh
:class:`~esper.core.worker.WorkerContext`; the runner believes an attempt
is up only once it calls ``ctx.started()`` and judges it by
``ctx.silence()``, its least recently progressing component. Every failure
is logged once, with its traceback.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from esper.core.redact import mask_url
from esper.core.worker import WorkerContext, WorkerExited, unwrap
from esper.weatherlight.specs import BackoffPolicy, RestartPolicy, WatchdogTimeout, WorkerSpec, WorkerStatus


class WorkerRunner:
    """Runs one ``WorkerSpec`` until it stops, completes or fails for good (``await run()``).

    ``changed`` is called whenever the worker settles in a way its owner must
    notice (finished, failed); ``abandon`` takes ownership of an attempt that
    ignored cancellation. ``stop`` is set by the owner when this worker's turn
    to stop has come; ``booted`` resolves once it started, or once a one-shot
    step completed.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        backoff: BackoffPolicy,
        rng: random.Random,
        log: structlog.stdlib.BoundLogger,
        changed: Callable[[], None],
        abandon: Callable[[asyncio.Task[None]], None],
    ) -> None:
        self.spec = spec
        self.stop = asyncio.Event()
        self.booted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = WorkerStatus.STARTING
        self.restarts = 0
        self.backoff_s = 0.0
        self.last_error: tuple[str, str] | None = None  # (type, message), secrets masked
        self.last_error_at: float | None = None
        self.started_at: float | None = None
        self.ctx: WorkerContext | None = None  # the current attempt's context
        self.task: asyncio.Task[None] | None = None  # this runner's own task, set by its owner
        self.attempt: asyncio.Task[None] | None = None
        self.delays: list[float] = []  # every backoff waited, for tests/ops
        self._restart_times: deque[float] = deque()
        self._policy = spec.backoff or backoff
        self._rng = rng
        self._log = log.bind(worker=spec.name)
        self._supervisor_log = log
        self._changed = changed
        self._abandon = abandon

    # -- the life ------------------------------------------------------------------------

    async def run(self) -> None:
        """Attempt, decide, back off, repeat."""
        spec = self.spec
        log = self._log
        level = 0
        while True:
            began = time.monotonic()
            error, started = await self._attempt()
            if self.stop.is_set():
                if error is not None and not isinstance(error, asyncio.CancelledError):
                    self._record(error, "worker failed while stopping")
                if self.status is not WorkerStatus.FAILED:
                    self.status = WorkerStatus.STOPPED
                return
            if error is None and not started and spec.restart is not RestartPolicy.PERMANENT:
                log.info("worker completed")  # a one-shot step did its job
                self.status = WorkerStatus.STOPPED
                _resolve(self.booted)
                return
            if error is None and not started:
                error = WorkerExited(f"{spec.name} returned before it started")
            if error is not None:
                self._record(error, "worker failed")
            if spec.restart is RestartPolicy.TEMPORARY or (
                spec.restart is RestartPolicy.TRANSIENT and error is None
            ):
                self.status = WorkerStatus.STOPPED
                log.info("worker finished", restarted=False)
                self._changed()
                return
            if error is None:
                log.info("worker returned; restarting it", restart=spec.restart.value)
            now = time.monotonic()
            if now - began >= self._policy.stable_s:
                level = 0
            self._restart_times.append(now)
            while self._restart_times and now - self._restart_times[0] > spec.max_restarts_window_s:
                self._restart_times.popleft()
            if len(self._restart_times) > spec.max_restarts:
                self.status = WorkerStatus.FAILED
                log.error(
                    "restart intensity exceeded",
                    restarts=self.restarts,
                    limit=f"{spec.max_restarts} in {spec.max_restarts_window_s}s",
                    required=spec.required,
                )
                self._changed()
                return
            delay = self._policy.delay(level, self._rng)
            level += 1
            self.status, self.backoff_s = WorkerStatus.BACKING_OFF, delay
            self.delays.append(delay)
            log.info("worker backing off", delay_s=round(delay, 3))
            try:  # an event wait with a timeout: shutdown interrupts it at once
                await asyncio.wait_for(self.stop.wait(), delay)
                self.status, self.backoff_s = WorkerStatus.STOPPED, 0.0
                return
            except TimeoutError:
                self.restarts += 1

    async def _attempt(self) -> tuple[BaseException | None, bool]:
        """Run one attempt with a fresh context: (its error or None, whether it had started)."""
        spec = self.spec
        ctx = WorkerContext(spec.name)
        self.ctx = ctx
        if self.stop.is_set():
            ctx.stopping.set()
        self.status, self.backoff_s = WorkerStatus.STARTING, 0.0
        self.started_at = time.time()
        task = asyncio.create_task(spec.run(ctx), name=f"weatherlight.{spec.name}.attempt")
        self.attempt = task
        started = asyncio.ensure_future(ctx.wait_started())
        try:
            await asyncio.wait(
                {task, started}, timeout=spec.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not ctx.is_started and not task.done():
                await self._give_up(task, "did not start in time")
                return TimeoutError(f"not started within {spec.ready_timeout_s}s"), False
            if ctx.is_started:
                self.status = WorkerStatus.RUNNING
                _resolve(self.booted)
                self._supervisor_log.info("worker started", worker=spec.name)
            error = await self._watch(ctx, task)
            if error is not None:
                return error, ctx.is_started
        finally:
            started.cancel()
            if not task.done():  # the runner itself was cancelled; shutdown accounts for the attempt
                task.cancel()
        if task.cancelled():
            return asyncio.CancelledError("attempt cancelled"), ctx.is_started
        error = task.exception()
        return (unwrap(error) if error is not None else None), ctx.is_started

    async def _watch(self, ctx: WorkerContext, task: asyncio.Task[None]) -> BaseException | None:
        """Wait for the attempt to end; cancel it when a component stays silent too long."""
        timeout = self.spec.heartbeat_timeout_s
        while not task.done():
            if timeout is None or ctx.stopping.is_set():  # draining is judged by the grace period
                await asyncio.wait({task})
                break
            component, silent_s = ctx.silence()
            left = timeout - silent_s
            if left <= 0:
                self._supervisor_log.error(
                    "watchdog: component made no progress; restarting the worker",
                    worker=self.spec.name,
                    component=component,
                    silent_s=round(silent_s, 3),
                    limit_s=timeout,
                )
                await self._give_up(task, f"{component} silent")
                return WatchdogTimeout(f"{component} made no progress for {silent_s:.1f}s (limit {timeout}s)")
            await asyncio.wait({task}, timeout=left)
        return None

    async def _give_up(self, task: asyncio.Task[None], why: str) -> None:
        """Stop and cancel an attempt; one deaf to both is abandoned (and accounted for)."""
        if self.ctx is not None:
            self.ctx.stopping.set()
        task.cancel()
        await asyncio.wait({task}, timeout=self.spec.grace_s)
        if not task.done():
            self._supervisor_log.error(
                "attempt ignored cancellation; abandoning it", worker=self.spec.name, why=why
            )
            self._abandon(task)

    def _record(self, error: BaseException, what: str) -> None:
        self.last_error = (type(error).__name__, mask_url(str(error)))
        self.last_error_at = time.time()
        detail = f"{self.last_error[0]}: {self.last_error[1]}" if self.last_error[1] else self.last_error[0]
        if isinstance(error, WatchdogTimeout | WorkerExited) or error.__traceback__ is None:
            self._log.error(what, error=detail)
        else:
            self._log.error(what, error=detail, exc_info=error)

    # -- what the owner reads ---------------------------------------------------------------

    def view(self) -> dict[str, Any]:
        silent: dict[str, Any] | None = None
        if self.ctx is not None and self.status is WorkerStatus.RUNNING:
            component, seconds = self.ctx.silence()
            silent = {"component": component, "seconds": round(seconds, 3)}
        error = (
            None if self.last_error is None else {"type": self.last_error[0], "message": self.last_error[1]}
        )
        return {
            "name": self.spec.name,
            "status": self.status.value,
            "required": self.spec.required,
            "restart": self.spec.restart.value,
            "restarts": self.restarts,
            "backoff_seconds": round(self.backoff_s, 3),
            "last_error": error,
            "last_error_ts": self.last_error_at,
            "started_at": self.started_at,
            "silent": silent,
        }


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
