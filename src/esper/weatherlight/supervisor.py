"""A small OTP-style supervisor for the service's workers, on the one worker contract.

Every worker is ``async def run(ctx)`` (:mod:`esper.core.worker`). The
supervisor gives each *attempt* a fresh :class:`~esper.core.worker.WorkerContext`,
believes a worker is up only once it calls ``ctx.started()``, and judges a
running attempt by ``ctx.silence()``: the least recently progressing of its
components. Each worker has a restart policy, an exponential backoff that
resets after a stable run, and a restart-intensity limit whose breach marks
it FAILED (for a *required* worker the service then ends non-zero so
systemd/Kubernetes takes over). Boot is sequential and gated, each step
retried within its ready timeout; shutdown runs in reverse boot order under
one global deadline and never hangs on a task that ignores cancellation:
such stragglers are named, logged and abandoned.

Every task is owned: one runner task per worker, which owns one attempt task
at a time. Every failure is logged once, with its traceback.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from esper.core.logs import get_logger
from esper.core.redact import mask_url
from esper.core.worker import Worker, WorkerContext, WorkerExited, unwrap


class RestartPolicy(enum.Enum):
    """When a finished attempt is started again (Erlang's child restart types)."""

    PERMANENT = "permanent"  # always: after a failure and after a clean return
    TRANSIENT = "transient"  # only after a failure (an exception or a watchdog timeout)
    TEMPORARY = "temporary"  # never


class WorkerStatus(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"
    FAILED = "failed"


class BootError(RuntimeError):
    """A boot step failed or did not become ready in time; boot was aborted."""


class WatchdogTimeout(TimeoutError):
    """A running attempt's least recently progressing component was silent too long."""


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
    """How to run one worker.

    ``run`` is called once per attempt with a fresh ``WorkerContext``. The
    body builds its components (clients, consumers, caches) inside that
    call, so an attempt never inherits the state that made the previous one
    fail, and an abandoned attempt can never report progress for its
    successor.

    Readiness: an attempt is up once it calls ``ctx.started()``; nothing else
    counts. The one exception is a *one-shot* step: a ``TRANSIENT`` or
    ``TEMPORARY`` worker whose attempt returns cleanly without calling
    ``started()`` has completed its job; boot moves on and the worker ends
    STOPPED. A ``PERMANENT`` worker returning before ``started()`` has failed
    (``WorkerExited``).

    Boot waits up to ``ready_timeout_s`` for a step. Within that time a
    failed attempt is retried after its backoff when the policy restarts
    failures (``PERMANENT``, ``TRANSIENT``); a ``TEMPORARY`` step that fails
    fails the boot at once. After boot, an attempt that has not started
    within ``ready_timeout_s`` is cancelled and counted as a failure.

    With ``heartbeat_timeout_s``, a started attempt whose ``ctx.silence()``
    exceeds it is cancelled and counted as a failure naming the silent
    component. Set it above the longest quiet stretch a healthy component
    has (a blocking read's timeout, a periodic worker's interval).
    """

    name: str
    run: Worker
    restart: RestartPolicy = RestartPolicy.PERMANENT
    required: bool = True
    heartbeat_timeout_s: float | None = None
    grace_s: float = 2.0
    ready_timeout_s: float = 30.0
    max_restarts: int = 5  # more than this many restarts ...
    max_restarts_window_s: float = 60.0  # ... within this window marks the worker FAILED
    backoff: BackoffPolicy | None = None  # None: the supervisor's policy


@dataclass
class _Worker:
    spec: WorkerSpec
    stop: asyncio.Event  # this worker's turn to stop has come
    booted: asyncio.Future[None]  # started once, or a one-shot step completed
    status: WorkerStatus = WorkerStatus.STARTING
    restarts: int = 0
    backoff_s: float = 0.0
    last_error: tuple[str, str] | None = None  # (type, message), secrets masked
    last_error_at: float | None = None
    started_at: float | None = None
    ctx: WorkerContext | None = None  # the current attempt's context
    runner: asyncio.Task[None] | None = None
    attempt: asyncio.Task[None] | None = None
    delays: list[float] = field(default_factory=list)  # every backoff waited, for tests/ops
    restart_times: deque[float] = field(default_factory=deque)

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
        """Start workers one at a time; each must be up before the next starts.

        A step fails when its worker gives up (a ``TEMPORARY`` failure, the
        restart-intensity limit), is not up within ``ready_timeout_s``
        (failed attempts meanwhile are retried), or a stop is requested.
        Then every worker already started is stopped (reverse order) and
        ``BootError`` is raised.
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
                {worker.booted, worker.runner, self._stop_fut},
                timeout=spec.ready_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not worker.booted.done() or self._stop_reason is not None:
                reason = self._boot_failure(worker)
                self.log.error("boot aborted", worker=spec.name, reason=reason)
                self._boot_error = reason
                await self.shutdown(self.boot_abort_deadline_s)
                raise BootError(reason)
        self._booted = True

    def _boot_failure(self, w: _Worker) -> str:
        if self._stop_reason is not None:
            return f"stop requested during boot ({self._stop_reason})"
        last = f"{w.last_error[0]}: {w.last_error[1]}" if w.last_error else None
        if w.runner is not None and w.runner.done():
            return f"{w.spec.name}: {last or 'ended before it started'}"
        suffix = f" (last error: {last})" if last else ""
        return f"{w.spec.name}: not up within {w.spec.ready_timeout_s}s{suffix}"

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
            failed = self.failed_required()
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
        spec = w.spec
        policy = spec.backoff or self.backoff
        log = self.log.bind(worker=spec.name)
        level = 0
        while True:
            began = time.monotonic()
            error, started = await self._attempt(w)
            if w.stop.is_set():
                if error is not None and not isinstance(error, asyncio.CancelledError):
                    self._record(w, error, log, "worker failed while stopping")
                if w.status is not WorkerStatus.FAILED:
                    w.status = WorkerStatus.STOPPED
                return
            if error is None and not started and spec.restart is not RestartPolicy.PERMANENT:
                log.info("worker completed")  # a one-shot step did its job
                w.status = WorkerStatus.STOPPED
                _resolve(w.booted)
                return
            if error is None and not started:
                error = WorkerExited(f"{spec.name} returned before it started")
            if error is not None:
                self._record(w, error, log, "worker failed")
            if spec.restart is RestartPolicy.TEMPORARY or (
                spec.restart is RestartPolicy.TRANSIENT and error is None
            ):
                w.status = WorkerStatus.STOPPED
                log.info("worker finished", restarted=False)
                self._wake.set()
                return
            if error is None:
                log.info("worker returned; restarting it", restart=spec.restart.value)
            now = time.monotonic()
            if now - began >= policy.stable_s:
                level = 0
            w.restart_times.append(now)
            while w.restart_times and now - w.restart_times[0] > spec.max_restarts_window_s:
                w.restart_times.popleft()
            if len(w.restart_times) > spec.max_restarts:
                w.status = WorkerStatus.FAILED
                log.error(
                    "restart intensity exceeded",
                    restarts=w.restarts,
                    limit=f"{spec.max_restarts} in {spec.max_restarts_window_s}s",
                    required=spec.required,
                )
                self._wake.set()
                return
            delay = policy.delay(level, self._rng)
            level += 1
            w.status, w.backoff_s = WorkerStatus.BACKING_OFF, delay
            w.delays.append(delay)
            log.info("worker backing off", delay_s=round(delay, 3))
            try:  # an event wait with a timeout: shutdown interrupts it at once
                await asyncio.wait_for(w.stop.wait(), delay)
                w.status, w.backoff_s = WorkerStatus.STOPPED, 0.0
                return
            except TimeoutError:
                w.restarts += 1

    async def _attempt(self, w: _Worker) -> tuple[BaseException | None, bool]:
        """Run one attempt with a fresh context: (its error or None, whether it had started)."""
        spec = w.spec
        ctx = WorkerContext(spec.name)
        w.ctx = ctx
        if w.stop.is_set():
            ctx.stopping.set()
        w.status, w.backoff_s = WorkerStatus.STARTING, 0.0
        w.started_at = time.time()
        task = asyncio.create_task(spec.run(ctx), name=f"weatherlight.{spec.name}.attempt")
        w.attempt = task
        started = asyncio.ensure_future(ctx.wait_started())
        try:
            await asyncio.wait(
                {task, started}, timeout=spec.ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if not ctx.is_started and not task.done():
                await self._give_up(w, task, "did not start in time")
                return TimeoutError(f"not started within {spec.ready_timeout_s}s"), False
            if ctx.is_started:
                w.status = WorkerStatus.RUNNING
                _resolve(w.booted)
                self.log.info("worker started", worker=spec.name)
            error = await self._watch(w, ctx, task)
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

    async def _watch(self, w: _Worker, ctx: WorkerContext, task: asyncio.Task[None]) -> BaseException | None:
        """Wait for the attempt to end; cancel it when a component stays silent too long."""
        timeout = w.spec.heartbeat_timeout_s
        while not task.done():
            if timeout is None or ctx.stopping.is_set():  # draining is judged by the grace period
                await asyncio.wait({task})
                break
            component, silent_s = ctx.silence()
            left = timeout - silent_s
            if left <= 0:
                self.log.error(
                    "watchdog: component made no progress; restarting the worker",
                    worker=w.spec.name,
                    component=component,
                    silent_s=round(silent_s, 3),
                    limit_s=timeout,
                )
                await self._give_up(w, task, f"{component} silent")
                return WatchdogTimeout(f"{component} made no progress for {silent_s:.1f}s (limit {timeout}s)")
            await asyncio.wait({task}, timeout=left)
        return None

    async def _give_up(self, w: _Worker, task: asyncio.Task[None], why: str) -> None:
        """Stop and cancel an attempt; one deaf to both is abandoned (and accounted for)."""
        if w.ctx is not None:
            w.ctx.stopping.set()
        task.cancel()
        await asyncio.wait({task}, timeout=w.spec.grace_s)
        if not task.done():
            self.log.error("attempt ignored cancellation; abandoning it", worker=w.spec.name, why=why)
            self._abandon(task)

    def _record(self, w: _Worker, error: BaseException, log: structlog.stdlib.BoundLogger, what: str) -> None:
        w.last_error = (type(error).__name__, mask_url(str(error)))
        w.last_error_at = self._last_error_ts = time.time()
        detail = f"{w.last_error[0]}: {w.last_error[1]}" if w.last_error[1] else w.last_error[0]
        if isinstance(error, WatchdogTimeout | WorkerExited) or error.__traceback__ is None:
            log.error(what, error=detail)
        else:
            log.error(what, error=detail, exc_info=error)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """A runner ending wakes ``wait()``; a runner crashing is a supervisor bug, logged loudly."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("worker runner crashed", task=task.get_name(), exc_info=task.exception())
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
            w.stop.set()
            if w.ctx is not None:
                w.ctx.stopping.set()
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
            failed_required=self.failed_required(),
            boot_error=self._boot_error,
            elapsed_s=time.monotonic() - began,
        )
        self.result = result
        self.log.info("supervisor stopped", clean=result.clean, stragglers=result.stragglers)
        return result

    def _abandon(self, task: asyncio.Task[None]) -> None:
        """Keep a reference to a straggler and log when (if ever) it finally ends."""
        if task in self._abandoned:
            return
        self._abandoned.add(task)

        def _finished(done: asyncio.Task[None]) -> None:
            self._abandoned.discard(done)
            error = None if done.cancelled() else done.exception()
            self.log.warning(
                "abandoned task finished", task=done.get_name(), error=type(error).__name__ if error else None
            )

        task.add_done_callback(_finished)

    # -- observability ---------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def booted(self) -> bool:
        return self._booted

    @property
    def abandoned(self) -> frozenset[asyncio.Task[None]]:
        return frozenset(self._abandoned)

    def worker(self, name: str) -> dict[str, Any]:
        return self._workers[name].view()

    def delays(self, name: str) -> list[float]:
        """Every backoff delay this worker has waited, in order."""
        return list(self._workers[name].delays)

    def snapshot(self) -> dict[str, Any]:
        """Counts and per-worker state for ``/status``, ``/metrics``, health and telemetry."""
        workers = [self._workers[n].view() for n in self._order]
        statuses = [w["status"] for w in workers]
        backing_off = statuses.count(WorkerStatus.BACKING_OFF.value)
        failed = statuses.count(WorkerStatus.FAILED.value)
        return {
            "booted": self._booted,
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

    def failed_required(self) -> tuple[str, ...]:
        return tuple(
            n
            for n in self._order
            if self._workers[n].spec.required and self._workers[n].status is WorkerStatus.FAILED
        )


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _wait_all(tasks: set[asyncio.Task[None]], budget_s: float) -> None:
    """Wait for tasks up to ``budget_s``; with no time left, still let cancellations land."""
    if budget_s > 0:
        await asyncio.wait(tasks, timeout=budget_s)
        return
    for _ in range(3):
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0)
