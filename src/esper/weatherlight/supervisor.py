"""A small OTP-style supervisor for the service's long-running asyncio workers.

Why this exists: the original wrapper never reset
its backoff, never restarted a cleanly returning worker, had no watchdog, no
intensity limit, and cancelled everything at once with no deadline. Here each
worker has a restart policy, an exponential backoff that resets after a
stable run, a restart-intensity limit that escalates (a failed *required*
worker ends the process non-zero so systemd/Kubernetes takes over), and a
heartbeat watchdog. Boot is sequential and gated; shutdown runs in reverse
boot order under one global deadline and never hangs on a task that ignores
cancellation: such stragglers are named, logged and abandoned.

Every task is owned: one runner task per worker, which owns one attempt task
at a time. Nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from esper.core.logs import get_logger


class RestartPolicy(enum.Enum):
    """When a finished worker is started again (Erlang's child restart types)."""

    PERMANENT = "permanent"  # always, also after a clean return
    TRANSIENT = "transient"  # only after an exception (or watchdog timeout)
    TEMPORARY = "temporary"  # never


class WorkerStatus(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"
    FAILED = "failed"


class BootError(RuntimeError):
    """A boot step failed or did not become ready in time; boot was aborted."""


@dataclass(frozen=True)
class BackoffPolicy:
    """Exponential restart delay: ``base_s * factor**n`` capped, jittered, reset when stable."""

    base_s: float = 1.0
    factor: float = 2.0
    cap_s: float = 30.0
    jitter: float = 0.1  # fraction, symmetric; decorrelates workers failing together
    stable_s: float = 60.0  # an attempt that ran this long resets the schedule

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.cap_s, self.base_s * self.factor**attempt)
        low, high = raw * (1 - self.jitter), min(self.cap_s, raw * (1 + self.jitter))
        return (rng or random).uniform(low, max(low, high))


@dataclass(frozen=True)
class WorkerSpec:
    """How to run one worker. ``factory(ctx)`` is called afresh for every attempt."""

    name: str
    factory: Callable[[WorkerContext], Awaitable[None]]
    restart: RestartPolicy = RestartPolicy.PERMANENT
    required: bool = True
    heartbeat_timeout_s: float | None = None
    grace_s: float = 2.0
    wait_ready: bool = False  # boot waits for ctx.mark_ready() instead of the first step
    ready_timeout_s: float = 30.0
    max_restarts: int = 5  # more than this many restarts ...
    max_restarts_window_s: float = 60.0  # ... within this window marks the worker FAILED
    backoff: BackoffPolicy | None = None  # None: the supervisor's policy


class WorkerContext:
    """What a worker sees: heartbeat, readiness, its stop signal and a bound logger."""

    def __init__(self, state: _Worker, logger: structlog.stdlib.BoundLogger) -> None:
        self._state = state
        self.name = state.spec.name
        self.logger = logger
        #: Set when this worker's turn to stop has come; drain and return.
        self.stopping: asyncio.Event = state.stopping

    def heartbeat(self) -> None:
        """Tell the watchdog this worker is alive."""
        self._state.last_heartbeat = time.monotonic()

    def mark_ready(self) -> None:
        """This attempt is up: boot may proceed to the next worker (see ``wait_ready``)."""
        if self._state.status is WorkerStatus.STARTING:
            self._state.status = WorkerStatus.RUNNING
        if not self._state.ready.done():
            self._state.ready.set_result(None)


@dataclass
class _Worker:
    spec: WorkerSpec
    stopping: asyncio.Event
    ready: asyncio.Future[None]
    status: WorkerStatus = WorkerStatus.STARTING
    restarts: int = 0
    backoff_s: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None
    started_at: float | None = None
    last_heartbeat: float = 0.0
    runner: asyncio.Task[None] | None = None
    attempt: asyncio.Task[None] | None = None
    delays: list[float] = field(default_factory=list)  # every backoff waited, for tests/ops
    restart_times: deque[float] = field(default_factory=deque)

    def view(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "status": self.status.value,
            "required": self.spec.required,
            "restart": self.spec.restart.value,
            "restarts": self.restarts,
            "backoff_seconds": round(self.backoff_s, 3),
            "last_error": self.last_error,
            "last_error_ts": self.last_error_at,
            "started_at": self.started_at,
        }


@dataclass(frozen=True)
class ShutdownResult:
    """How the supervisor ended; ``exit_code`` is what the process should return."""

    clean: bool
    deadline_hit: bool
    stragglers: tuple[str, ...] = ()
    failed_required: tuple[str, ...] = ()
    boot_error: str | None = None
    elapsed_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.clean and not self.failed_required and self.boot_error is None else 1


class Supervisor:
    """Owns worker tasks: boots them in order, restarts them, stops them in reverse."""

    def __init__(
        self,
        backoff: BackoffPolicy | None = None,
        *,
        logger: structlog.stdlib.BoundLogger | None = None,
        rng: random.Random | None = None,
        boot_abort_deadline_s: float = 10.0,
    ) -> None:
        self.backoff = backoff or BackoffPolicy()
        self.log = logger or get_logger("esper.weatherlight.supervisor")
        self._rng = rng or random.Random()
        self._workers: dict[str, _Worker] = {}
        self._order: list[str] = []
        self._wake = asyncio.Event()
        self._stop_reason: str | None = None
        self._stopping = False
        self._booted = False
        self._started_mono = time.monotonic()
        self._last_error_ts: float | None = None
        self._abandoned: set[asyncio.Task[None]] = set()
        self._stop_fut: asyncio.Future[None] | None = None
        self._boot_error: str | None = None
        #: The outcome of the last ``shutdown()`` (also the one run by an aborted boot).
        self.result: ShutdownResult | None = None
        #: Deadline for stopping the already-started workers when boot aborts.
        self.boot_abort_deadline_s = boot_abort_deadline_s

    # -- boot --------------------------------------------------------------------

    async def start(self, specs: Iterable[WorkerSpec]) -> None:
        """Start workers one at a time; each must be ready before the next starts.

        A step fails when its worker ends before it is ready, is not ready in
        ``ready_timeout_s``, or a stop is requested meanwhile. Then every worker
        already started is stopped (reverse order) and ``BootError`` is raised.
        """
        loop = asyncio.get_running_loop()
        if self._stop_fut is None:
            self._stop_fut = loop.create_future()
            if self._stop_reason is not None:
                self._stop_fut.set_result(None)
        for spec in specs:
            if spec.name in self._workers:
                raise ValueError(f"duplicate worker name {spec.name!r}")
            worker = _Worker(spec, asyncio.Event(), loop.create_future())
            self._workers[spec.name] = worker
            self._order.append(spec.name)
            worker.runner = asyncio.create_task(self._run(worker), name=f"weatherlight.{spec.name}")
            worker.runner.add_done_callback(self._runner_done)
            await asyncio.wait(
                {worker.ready, worker.runner, self._stop_fut},
                timeout=spec.ready_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not worker.ready.done() or self._stop_reason is not None:
                if self._stop_reason is not None:
                    reason = f"stop requested during boot ({self._stop_reason})"
                elif worker.runner.done():
                    reason = f"{spec.name}: {worker.last_error or 'ended before it was ready'}"
                else:
                    reason = f"{spec.name}: not ready within {spec.ready_timeout_s}s"
                self.log.error("boot aborted", worker=spec.name, reason=reason)
                self._boot_error = reason
                await self.shutdown(self.boot_abort_deadline_s)
                raise BootError(reason)
            self.log.info("worker ready", worker=spec.name)
        self._booted = True

    # -- running -----------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Ask ``wait()`` to return (e.g. from a signal handler); idempotent."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._stop_fut is not None and not self._stop_fut.done():
            self._stop_fut.set_result(None)
        self._wake.set()

    async def wait(self) -> str:
        """Block until a stop is requested, a required worker fails, or nothing is left to run."""
        while True:
            if self._stop_reason is not None:
                return self._stop_reason
            failed = self._failed_required()
            if failed:
                return f"required worker failed: {', '.join(failed)}"
            if all(w.runner is not None and w.runner.done() for w in self._workers.values()):
                return "all workers finished"
            self._wake.clear()
            await self._wake.wait()

    async def run(self, specs: Iterable[WorkerSpec], shutdown_deadline_s: float) -> ShutdownResult:
        """Boot, run until told to stop or a required worker fails, then shut down."""
        try:
            await self.start(specs)
        except BootError as exc:
            return self.result or ShutdownResult(False, False, boot_error=str(exc))
        reason = await self.wait()
        self.log.info("supervisor stopping", reason=reason)
        return await self.shutdown(shutdown_deadline_s)

    async def _run(self, w: _Worker) -> None:
        """One worker's life: attempt, decide, back off, repeat."""
        policy = w.spec.backoff or self.backoff
        log = self.log.bind(worker=w.spec.name)
        ctx = WorkerContext(w, log)
        level = 0
        while True:
            began = time.monotonic()
            error = await self._attempt(w, ctx)
            if error is not None:
                self._record_error(w, error)
                log.error("worker failed", error=w.last_error)
            if w.stopping.is_set():
                w.status = WorkerStatus.STOPPED
                return
            if not w.ready.done():  # boot step ended: done if clean (one-shot steps), else failed
                if error is not None:
                    w.status = WorkerStatus.FAILED
                    return
                w.ready.set_result(None)
            if w.spec.restart is RestartPolicy.TEMPORARY or (
                w.spec.restart is RestartPolicy.TRANSIENT and error is None
            ):
                w.status = WorkerStatus.STOPPED
                log.info("worker finished", error=w.last_error if error else None)
                return
            now = time.monotonic()
            if now - began >= policy.stable_s:
                level = 0
            w.restart_times.append(now)
            while w.restart_times and now - w.restart_times[0] > w.spec.max_restarts_window_s:
                w.restart_times.popleft()
            if len(w.restart_times) > w.spec.max_restarts:
                w.status = WorkerStatus.FAILED
                log.error("restart intensity exceeded", restarts=w.restarts, required=w.spec.required)
                self._wake.set()
                return
            delay = policy.delay(level, self._rng)
            level += 1
            w.status, w.backoff_s = WorkerStatus.BACKING_OFF, delay
            w.delays.append(delay)
            log.info("worker backing off", delay_s=round(delay, 3))
            try:  # an event wait with a timeout: shutdown interrupts it at once
                await asyncio.wait_for(w.stopping.wait(), delay)
                w.status, w.backoff_s = WorkerStatus.STOPPED, 0.0
                return
            except TimeoutError:
                w.restarts += 1

    async def _attempt(self, w: _Worker, ctx: WorkerContext) -> BaseException | None:
        """Run one attempt under the watchdog; return its error (None for a clean return)."""
        w.status, w.backoff_s = WorkerStatus.STARTING, 0.0
        w.started_at, w.last_heartbeat = time.time(), time.monotonic()
        task = asyncio.create_task(_call(w.spec.factory, ctx), name=f"weatherlight.{w.spec.name}.attempt")
        w.attempt = task
        try:
            await asyncio.sleep(0)  # let the attempt take its first step
            if not w.spec.wait_ready and not task.done():
                ctx.mark_ready()
            timeout = w.spec.heartbeat_timeout_s
            while not task.done():
                left = None if timeout is None else w.last_heartbeat + timeout - time.monotonic()
                if left is not None and left <= 0:
                    task.cancel()
                    await asyncio.wait({task}, timeout=w.spec.grace_s)
                    if not task.done():  # hung and deaf to cancellation: account for it, move on
                        self.log.error("hung worker ignored cancellation", worker=w.spec.name)
                        self._abandon(task)
                    return TimeoutError(f"watchdog timeout: no heartbeat for {timeout}s")
                await asyncio.wait({task}, timeout=left)
        finally:
            if not task.done():  # the runner itself was cancelled; shutdown accounts for the attempt
                task.cancel()
        if task.cancelled():
            return asyncio.CancelledError("attempt cancelled")
        return task.exception()

    def _record_error(self, w: _Worker, error: BaseException) -> None:
        w.last_error = _describe(error)
        w.last_error_at = self._last_error_ts = time.time()

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """A runner ending wakes ``wait()``; a runner crashing is a supervisor bug, logged loudly."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("worker runner crashed", task=task.get_name(), error=_describe(task.exception()))
            for w in self._workers.values():
                if w.runner is task:
                    w.status = WorkerStatus.FAILED
        self._wake.set()

    # -- shutdown ----------------------------------------------------------------

    async def shutdown(self, deadline_s: float) -> ShutdownResult:
        """Stop workers in reverse boot order, each with its grace, under one deadline."""
        self._stopping = True
        self.request_stop("shutdown")
        began = time.monotonic()
        deadline = began + deadline_s
        stragglers: list[str] = []
        for name in reversed(self._order):
            w = self._workers[name]
            w.stopping.set()
            tasks = {t for t in (w.runner, w.attempt) if t is not None and not t.done()}
            if not tasks:
                continue
            left = deadline - time.monotonic()
            await _wait_all(tasks, min(w.spec.grace_s, left))
            tasks = {t for t in tasks if not t.done()}
            if tasks:
                self.log.warning("worker did not stop in its grace period; cancelling", worker=name)
                for task in tasks:
                    task.cancel()
                await _wait_all(tasks, min(w.spec.grace_s, deadline - time.monotonic()))
            pending = {t for t in tasks if not t.done()}
            if pending:
                stragglers.append(name)
                self.log.error("worker ignored cancellation; abandoning it", worker=name)
                for task in pending:
                    self._abandon(task)
            elif w.status is not WorkerStatus.FAILED:
                w.status = WorkerStatus.STOPPED
            self.log.debug("worker stopped", worker=name, after_s=round(time.monotonic() - began, 3))
        deadline_hit = time.monotonic() >= deadline
        result = ShutdownResult(
            clean=not stragglers and not deadline_hit,
            deadline_hit=deadline_hit,
            stragglers=tuple(stragglers),
            failed_required=self._failed_required(),
            boot_error=self._boot_error,
            elapsed_s=time.monotonic() - began,
        )
        self.result = result
        self.log.info("supervisor stopped", clean=result.clean, stragglers=result.stragglers)
        return result

    def _abandon(self, task: asyncio.Task[None]) -> None:
        """Keep a reference to a straggler and log when (if ever) it finally ends."""
        self._abandoned.add(task)

        def _finished(done: asyncio.Task[None]) -> None:
            self._abandoned.discard(done)
            error = None if done.cancelled() else done.exception()
            self.log.warning("abandoned task finished", task=done.get_name(), error=_describe(error))

        task.add_done_callback(_finished)

    # -- observability ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def abandoned(self) -> frozenset[asyncio.Task[None]]:
        return frozenset(self._abandoned)

    def worker(self, name: str) -> dict[str, Any]:
        return self._workers[name].view()

    def delays(self, name: str) -> list[float]:
        """Every backoff delay this worker has waited, in order."""
        return list(self._workers[name].delays)

    def snapshot(self) -> dict[str, Any]:
        """Counts and per-worker state for ``/status`` and telemetry."""
        workers = [self._workers[n].view() for n in self._order]
        statuses = [w["status"] for w in workers]
        backing_off = statuses.count(WorkerStatus.BACKING_OFF.value)
        failed = statuses.count(WorkerStatus.FAILED.value)
        return {
            "healthy": backing_off == 0 and failed == 0,
            "ready": self._booted and not self._stopping and not self._failed_required(),
            "stopping": self._stopping,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "task_count": sum(1 for w in self._workers.values() if w.attempt and not w.attempt.done()),
            "backing_off": backing_off,
            "failed": failed,
            "restarts_total": sum(w["restarts"] for w in workers),
            "backoff_seconds": max((w["backoff_seconds"] for w in workers), default=0.0),
            "last_error_ts": self._last_error_ts,
            "workers": workers,
        }

    async def readiness_check(self) -> tuple[bool, str]:
        """A readiness check for the HTTP server: booted, not stopping, no required worker failed."""
        snap = self.snapshot()
        if snap["ready"]:
            return True, "ok"
        failed = self._failed_required()
        if self._stopping:
            return False, "stopping"
        return False, f"failed: {', '.join(failed)}" if failed else "booting"

    def _failed_required(self) -> tuple[str, ...]:
        return tuple(
            n
            for n in self._order
            if self._workers[n].spec.required and self._workers[n].status is WorkerStatus.FAILED
        )


async def _call(factory: Callable[[WorkerContext], Awaitable[None]], ctx: WorkerContext) -> None:
    await factory(ctx)


async def _wait_all(tasks: set[asyncio.Task[None]], budget_s: float) -> None:
    """Wait for tasks up to ``budget_s``; with no time left, still let cancellations land."""
    if budget_s > 0:
        await asyncio.wait(tasks, timeout=budget_s)
        return
    for _ in range(3):
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0)


def _describe(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
