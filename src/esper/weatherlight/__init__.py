"""Weatherlight: the service that composes and supervises Esper-Lite's workers.

The supervision parts depend on nothing above ``esper.core``: ``specs``
(what a worker is and how it restarts), ``runner`` (one worker's attempts,
watchdog and backoff), ``supervisor`` (ordered boot, reverse shutdown), the
periodic loop and the systemd notifier. The control plane is composed in
``service`` from its worker bodies (``workers``), what they built
(``components``), ``reporting`` (health, ``/status``, telemetry) and
``housekeeping``; ``health`` holds its one notion of health. The names below
are loaded on first use, so ``esper-weatherlight-service --version`` (whose
module lives in this package) starts without importing the control plane.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper.weatherlight.periodic import run_every
    from esper.weatherlight.sdnotify import SdNotifier
    from esper.weatherlight.service import WeatherlightService
    from esper.weatherlight.specs import (
        BackoffPolicy,
        BootError,
        RestartPolicy,
        ShutdownResult,
        WatchdogTimeout,
        WorkerSpec,
        WorkerStatus,
    )
    from esper.weatherlight.supervisor import Supervisor

_EXPORTS = {
    "BackoffPolicy": "specs",
    "BootError": "specs",
    "RestartPolicy": "specs",
    "SdNotifier": "sdnotify",
    "ShutdownResult": "specs",
    "Supervisor": "supervisor",
    "WatchdogTimeout": "specs",
    "WeatherlightService": "service",
    "WorkerSpec": "specs",
    "WorkerStatus": "specs",
    "run_every": "periodic",
}

__all__ = [
    "BackoffPolicy",
    "BootError",
    "RestartPolicy",
    "SdNotifier",
    "ShutdownResult",
    "Supervisor",
    "WatchdogTimeout",
    "WeatherlightService",
    "WorkerSpec",
    "WorkerStatus",
    "run_every",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"esper.weatherlight.{module}"), name)
