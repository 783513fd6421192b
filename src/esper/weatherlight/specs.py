"""What the supervisor is told and what it reports: worker specs, policies, statuses, outcomes.

These are the supervisor's vocabulary, kept apart from the machinery that
runs workers so that composing a service (building ``WorkerSpec`` lists,
reading a ``ShutdownResult``) needs none of it.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from esper.core.worker import Worker


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
