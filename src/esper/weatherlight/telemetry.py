"""The service's own telemetry packet, built from live state (never sticky).

Its health is the service's one verdict (:mod:`esper.weatherlight.health`):
HEALTHY, DEGRADED while something optional is off or a worker is backing
off, UNHEALTHY while a required path cannot work; it returns to HEALTHY as
soon as the cause clears.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from esper.core.telemetry import TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2
from esper.weatherlight.health import HEALTHY, UNHEALTHY, Health

_OPEN = leyline_pb2.CIRCUIT_STATE_OPEN
_WARNING = leyline_pb2.TELEMETRY_LEVEL_WARNING


def build_weatherlight_packet(
    snapshot: Mapping[str, Any],
    health: Health,
    *,
    breaker_states: Mapping[str, int],
    extra_metrics: Mapping[str, float],
) -> leyline_pb2.TelemetryPacket:
    """``snapshot`` is ``Supervisor.snapshot()``; ``extra_metrics`` are already-prefixed names."""
    open_breakers = sorted(name for name, state in breaker_states.items() if state == _OPEN)
    metrics = [
        TelemetryMetric("weatherlight.task_count", float(snapshot["task_count"]), "count"),
        TelemetryMetric("weatherlight.open_breakers", float(len(open_breakers)), "count"),
        TelemetryMetric("weatherlight.backoff_seconds", float(snapshot["backoff_seconds"]), "s"),
        TelemetryMetric("weatherlight.uptime_s", float(snapshot["uptime_s"]), "s"),
        TelemetryMetric("weatherlight.restarts_total", float(snapshot["restarts_total"]), "count"),
        TelemetryMetric("weatherlight.workers.backing_off", float(snapshot["backing_off"]), "count"),
        TelemetryMetric("weatherlight.workers.failed", float(snapshot["failed"]), "count"),
        TelemetryMetric("weatherlight.ready", 1.0 if health.ready else 0.0, "bool"),
    ]
    if snapshot.get("last_error_ts") is not None:
        metrics.append(
            TelemetryMetric("weatherlight.last_error_ts", float(snapshot["last_error_ts"]), "unix_s")
        )
    events: list[TelemetryEvent] = []
    for worker in snapshot["workers"]:
        name = worker["name"]
        running = worker["status"] == "running"
        metrics += [
            TelemetryMetric(f"weatherlight.worker.{name}.running", 1.0 if running else 0.0, "bool"),
            TelemetryMetric(f"weatherlight.worker.{name}.restarts", float(worker["restarts"]), "count"),
            TelemetryMetric(
                f"weatherlight.worker.{name}.backoff_seconds", float(worker["backoff_seconds"]), "s"
            ),
        ]
        if worker["status"] in ("backing_off", "failed"):
            error = worker.get("last_error") or {}
            events.append(
                TelemetryEvent(
                    "worker_unhealthy",
                    level=_WARNING,
                    attributes={
                        "worker": name,
                        "status": worker["status"],
                        "last_error": f"{error.get('type', '')}: {error.get('message', '')}" if error else "",
                    },
                )
            )
    metrics += [TelemetryMetric(name, float(value)) for name, value in sorted(extra_metrics.items())]
    for name in open_breakers:
        events.append(TelemetryEvent("breaker_open", level=_WARNING, attributes={"breaker": name}))
    for problem in health.problems:
        events.append(
            TelemetryEvent(
                "required_path_down", level=leyline_pb2.TELEMETRY_LEVEL_ERROR, attributes={"why": problem}
            )
        )
    status = health.status
    level = (
        leyline_pb2.TELEMETRY_LEVEL_INFO
        if status == HEALTHY
        else leyline_pb2.TELEMETRY_LEVEL_ERROR
        if status == UNHEALTHY
        else _WARNING
    )
    return build_telemetry_packet(
        source="weatherlight",
        packet_id=f"weatherlight-{uuid.uuid4().hex}",
        level=level,
        metrics=metrics,
        events=events,
        health_status=status,
        health_summary=health.summary,
        health_indicators={
            "workers": str(len(snapshot["workers"])),
            "system_mode": {HEALTHY: "operational", UNHEALTHY: "unavailable"}.get(status, "degraded"),
            "built_at": f"{time.time():.3f}",
        },
    )
