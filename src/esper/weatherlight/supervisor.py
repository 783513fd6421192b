"""A small OTP-style supervisor for the service's workers, on the one worker contract.

Every worker is ``async def run(ctx)`` (:mod:`esper.core.worker`), run by
its own :class:`~esper.weatherlight.runner.WorkerRunner` (fresh context per
attempt, watchdog, restart policy, backoff, restart-intensity limit). What
stays here is what concerns all workers together: boot is sequential and
gated, each step retried within its ready timeout; a *required* worker that
fails for good ends the service non-zero so systemd/Kubernetes takes over;
shutdown runs in reverse boot order under one global deadline and never hangs
on a task that ignores cancellation: such stragglers are named, logged and
abandoned (and kept referenced until they end).

Every task is owned: the supervisor owns one runner task per worker, which
owns one attempt task at a time.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from typing import Any

import structlog

from esper.core.logs import get_logger
from esper.weatherlight.runner import WorkerRunner
from esper.weatherlight.specs import BackoffPolicy, BootError, ShutdownResult, WorkerSpec, WorkerStatus


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
        self._workers: dict[str, WorkerRunner] = {}
        self._order: list[str] = []
        self._wake = asyncio.Event()
        self._stop_reason: str | None = None
        self._stopping = False
        self._boot_done = asyncio.Event()
        self._started_mono = time.monotonic()
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
            worker = WorkerRunner(
                spec,
                backoff=self.backoff,
                rng=self._rng,
                log=self.log,
                changed=self._wake.set,
                abandon=self._abandon,
            )
            self._workers[spec.name] = worker
            self._order.append(spec.name)
            worker.task = asyncio.create_task(worker.run(), name=f"weatherlight.{spec.name}")
            worker.task.add_done_callback(self._runner_done)
            await asyncio.wait(
                {worker.booted, worker.task, self._stop_fut},
                timeout=spec.ready_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not worker.booted.done() or self._stop_reason is not None:
                reason = self._boot_failure(worker)
                self.log.error("boot aborted", worker=spec.name, reason=reason)
                self._boot_error = reason
                await self.shutdown(self.boot_abort_deadline_s)
                raise BootError(reason)
        self._boot_done.set()

    def _boot_failure(self, w: WorkerRunner) -> str:
        if self._stop_reason is not None:
            return f"stop requested during boot ({self._stop_reason})"
        last = f"{w.last_error[0]}: {w.last_error[1]}" if w.last_error else None
        if w.task is not None and w.task.done():
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
            if all(w.task is not None and w.task.done() for w in self._workers.values()):
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

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        """A runner ending wakes ``wait()``; a runner crashing is a supervisor bug, logged loudly."""
        if not task.cancelled() and task.exception() is not None:
            self.log.error("worker runner crashed", task=task.get_name(), exc_info=task.exception())
            for w in self._workers.values():
                if w.task is task:
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
            tasks = {t for t in (w.task, w.attempt) if t is not None and not t.done()}
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
        return self._boot_done.is_set()

    async def wait_booted(self) -> None:
        """Until every boot step has started (forever if boot fails: the waiter is then stopped)."""
        await self._boot_done.wait()

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
            "booted": self.booted,
            "stopping": self._stopping,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "task_count": sum(1 for w in self._workers.values() if w.attempt and not w.attempt.done()),
            "backing_off": backing_off,
            "failed": failed,
            "restarts_total": sum(w["restarts"] for w in workers),
            "backoff_seconds": max((w["backoff_seconds"] for w in workers), default=0.0),
            "last_error_ts": max(
                (w.last_error_at for w in self._workers.values() if w.last_error_at is not None), default=None
            ),
            "workers": workers,
        }

    def failed_required(self) -> tuple[str, ...]:
        return tuple(
            n
            for n in self._order
            if self._workers[n].spec.required and self._workers[n].status is WorkerStatus.FAILED
        )


async def _wait_all(tasks: set[asyncio.Task[None]], budget_s: float) -> None:
    """Wait for tasks up to ``budget_s``; with no time left, still let cancellations land."""
    if budget_s > 0:
        await asyncio.wait(tasks, timeout=budget_s)
        return
    for _ in range(3):
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0)
