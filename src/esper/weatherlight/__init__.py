"""Weatherlight: the service that composes and supervises Esper-Lite's workers.

The supervision parts (supervisor, periodic loop, systemd notifier) depend on
nothing above ``esper.core``; ``service`` composes the control plane and
``health`` holds its one notion of health. Importing this package stays
light: the service module (and everything it pulls in) loads only when used.
"""

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
