"""The service's own telemetry packet, built from live state (never sticky).

Health is DEGRADED exactly while some worker is backing off or failed, or a
breaker is open, and HEALTHY again as soon as that clears.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from esper.core.telemetry import TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2

_OPEN = leyline_pb2.CIRCUIT_STATE_OPEN


def build_weatherlight_packet(
    snapshot: Mapping[str, Any],
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
    ]
    if snapshot.get("last_error_ts") is not None:
        metrics.append(
            TelemetryMetric("weatherlight.last_error_ts", float(snapshot["last_error_ts"]), "unix_s")
        )
    events: list[TelemetryEvent] = []
    troubled: list[str] = []
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
            troubled.append(f"{name}:{worker['status']}")
            events.append(
                TelemetryEvent(
                    "worker_unhealthy",
                    level=leyline_pb2.TELEMETRY_LEVEL_WARNING,
                    attributes={
                        "worker": name,
                        "status": worker["status"],
                        "last_error": str(worker.get("last_error") or ""),
                    },
                )
            )
    metrics += [TelemetryMetric(name, float(value)) for name, value in sorted(extra_metrics.items())]
    for name in open_breakers:
        events.append(
            TelemetryEvent(
                "breaker_open", level=leyline_pb2.TELEMETRY_LEVEL_WARNING, attributes={"breaker": name}
            )
        )
    degraded = bool(troubled or open_breakers)
    return build_telemetry_packet(
        source="weatherlight",
        packet_id=f"weatherlight-{uuid.uuid4().hex}",
        level=leyline_pb2.TELEMETRY_LEVEL_WARNING if degraded else leyline_pb2.TELEMETRY_LEVEL_INFO,
        metrics=metrics,
        events=events,
        health_status=leyline_pb2.HEALTH_STATUS_DEGRADED if degraded else leyline_pb2.HEALTH_STATUS_HEALTHY,
        health_summary=", ".join(troubled + [f"breaker:{b}" for b in open_breakers]) or "steady",
        health_indicators={
            "workers": str(len(snapshot["workers"])),
            "system_mode": "degraded" if degraded else "operational",
            "built_at": f"{time.time():.3f}",
        },
    )
