"""Weatherlight: the service that composes and supervises Esper-Lite's workers.

The supervision parts (supervisor, periodic loop, systemd notifier) depend on
nothing above ``esper.core``; ``service`` composes the control plane and
``health`` holds its one notion of health. The names below are loaded on
first use, so ``esper-weatherlight-service --version`` (whose module lives in
this package) starts without importing the control plane.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esper.weatherlight.periodic import run_every
    from esper.weatherlight.sdnotify import SdNotifier
    from esper.weatherlight.supervisor import (
        BackoffPolicy,
        BootError,
        RestartPolicy,
        ShutdownResult,
        Supervisor,
        WatchdogTimeout,
        WorkerSpec,
        WorkerStatus,
    )

_EXPORTS = {
    "BackoffPolicy": "supervisor",
    "BootError": "supervisor",
    "RestartPolicy": "supervisor",
    "SdNotifier": "sdnotify",
    "ShutdownResult": "supervisor",
    "Supervisor": "supervisor",
    "WatchdogTimeout": "supervisor",
    "WorkerSpec": "supervisor",
    "WorkerStatus": "supervisor",
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
    "WorkerSpec",
    "WorkerStatus",
    "run_every",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"esper.weatherlight.{module}"), name)
