"""The controller's configuration, its per-packet result and that result's telemetry.

Kept apart from the decision logic so the service layer can import the
plain data types, and so health roll-up rules live in one readable place:
CRITICAL if any event is critical, DEGRADED on a PAUSE or any warning,
HEALTHY otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from esper.core import TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2
from esper.tamiyo.policy import PolicyAction, PolicyOutput

WARNING = leyline_pb2.TELEMETRY_LEVEL_WARNING
#: Metric key prefix under which field reports carry the decision's features.
FEATURE_METRIC_PREFIX = "feature."


@dataclass(frozen=True)
class ControllerConfig:
    max_loss_spike: float = 0.15
    max_blueprint_risk: float = 0.8
    #: None: take ``settings.tamiyo_conservative_mode`` (False without settings).
    conservative_mode: bool | None = None
    #: Live seeds (GERMINATED..FOSSILIZED) allowed per run.
    max_seeds: int = 4
    max_runs: int = 1024
    telemetry_capacity: int = 256
    metadata_ttl_s: float = 300.0
    base_alpha: float = 0.1
    alpha_scale: float = 0.1
    optimizer_id: str = "sgd"
    lr_delta_scale: float = 0.1
    execution_deadline_ms: int = 0
    #: |loss change| below this is a NEUTRAL outcome.
    neutral_loss_band: float = 0.01


@dataclass(frozen=True)
class Decision:
    """What one packet produced. ``telemetry`` is also queued for :meth:`drain_telemetry`."""

    command: leyline_pb2.AdaptationCommand | None
    telemetry: leyline_pb2.TelemetryPacket
    action: PolicyAction
    policy_output: PolicyOutput
    events: tuple[str, ...]
    #: The report closing this run's previous command, if there was one.
    field_report: leyline_pb2.FieldReport | None = None


def build_decision_telemetry(
    state: leyline_pb2.SystemStatePacket,
    command: leyline_pb2.AdaptationCommand | None,
    output: PolicyOutput,
    events: list[TelemetryEvent],
    loss_trend: float | None,
    latency_ms: float,
    descriptor: leyline_pb2.BlueprintDescriptor | None,
    risk_reason: str,
    version: int,
    conservative: bool,
) -> leyline_pb2.TelemetryPacket:
    """The per-decision telemetry packet (metrics, events, health rolled up from them)."""
    metrics = [
        TelemetryMetric("tamiyo.validation_loss", float(state.validation_loss)),
        TelemetryMetric("tamiyo.loss_delta", loss_trend or 0.0),
        TelemetryMetric("tamiyo.conservative_mode", 1.0 if conservative else 0.0),
        TelemetryMetric("tamiyo.inference.latency_ms", latency_ms, unit="ms"),
        TelemetryMetric("tamiyo.policy.version", float(version)),
    ]
    if descriptor is not None:
        metrics.append(TelemetryMetric("tamiyo.blueprint.risk", float(descriptor.risk)))
    levels = [e.level for e in events]
    paused = command is not None and command.command_type == leyline_pb2.COMMAND_PAUSE
    if leyline_pb2.TELEMETRY_LEVEL_CRITICAL in levels:
        health = leyline_pb2.HEALTH_STATUS_CRITICAL
    elif paused or WARNING in levels:
        health = leyline_pb2.HEALTH_STATUS_DEGRADED
    else:
        health = leyline_pb2.HEALTH_STATUS_HEALTHY
    if paused:
        summary = risk_reason or "policy_pause"
    elif events:
        summary = events[-1].description
    else:
        summary = "stable"
    indicators = {
        "policy_version": str(version),
        "action": output.action.name.lower(),
        "conservative_mode": "1" if conservative else "0",
        "training_run_id": state.training_run_id,
        "packet_id": state.packet_id[:128],
    }
    if descriptor is not None:
        indicators["blueprint_tier"] = leyline_pb2.BlueprintTier.Name(descriptor.tier)
    return build_telemetry_packet(
        source="tamiyo",
        metrics=metrics,
        events=events,
        level=WARNING if WARNING in levels else leyline_pb2.TELEMETRY_LEVEL_INFO,
        health_status=health,
        health_summary=summary,
        health_indicators=indicators,
    )
