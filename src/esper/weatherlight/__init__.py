"""Weatherlight: the service that composes and supervises Esper-Lite's workers.

Only the reusable supervision parts live here so far; they depend on nothing
above ``esper.core`` so they can be tested alone and reused.
"""

from esper.core.http_server import HealthServer, ReadinessCheck
from esper.weatherlight.embedded_redis import EmbeddedRedis, EmbeddedRedisExited
from esper.weatherlight.sdnotify import SdNotifier
from esper.weatherlight.supervisor import (
    BackoffPolicy,
    BootError,
    RestartPolicy,
    ShutdownResult,
    Supervisor,
    WorkerContext,
    WorkerSpec,
    WorkerStatus,
)

__all__ = [
    "BackoffPolicy",
    "BootError",
    "EmbeddedRedis",
    "EmbeddedRedisExited",
    "HealthServer",
    "ReadinessCheck",
    "RestartPolicy",
    "SdNotifier",
    "ShutdownResult",
    "Supervisor",
    "WorkerContext",
    "WorkerSpec",
    "WorkerStatus",
]
