"""Turn bus traffic into Prometheus series.

Every ``MetricPoint`` of a ``TelemetryPacket`` becomes a gauge named after the
metric (sanitised to Prometheus rules and prefixed ``esper_``) with the
packet's source as a label, so ``weatherlight.uptime_s`` from the service
becomes ``esper_weatherlight_uptime_s{source="weatherlight"}``. Series are
created on first sight and registered on a caller-supplied registry.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge

from esper.leyline import leyline_pb2

_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_MAX_SERIES = 5000


def sanitize_metric_name(name: str) -> str:
    """Map a dotted platform metric name onto ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    cleaned = _INVALID.sub("_", name.strip()).strip("_") or "unnamed"
    if cleaned[0].isdigit():
        cleaned = f"_{cleaned}"
    return f"esper_{cleaned}"


class TelemetryMetrics:
    """Prometheus view of everything Nissa has consumed."""

    def __init__(self, registry: CollectorRegistry, max_series: int = _MAX_SERIES) -> None:
        self.registry = registry
        self._max_series = max_series
        self._gauges: dict[str, Gauge] = {}
        self._refused: set[str] = set()
        self.packets = Counter(
            "esper_telemetry_packets", "Telemetry packets consumed", ["source"], registry=registry
        )
        self.states = Counter(
            "esper_system_state_packets", "System state packets consumed", ["run"], registry=registry
        )
        self.field_reports = Counter(
            "esper_field_reports", "Field reports consumed", ["outcome"], registry=registry
        )
        self.commands = Counter(
            "esper_adaptation_commands", "Adaptation commands seen on the bus", ["type"], registry=registry
        )
        self.dropped_series = Counter(
            "esper_nissa_dropped_series",
            "Metric samples dropped because the series limit was reached",
            registry=registry,
        )
        self.validation_accuracy = Gauge(
            "esper_training_validation_accuracy",
            "Validation accuracy of the latest state packet",
            ["run"],
            registry=registry,
        )
        self.validation_loss = Gauge(
            "esper_training_validation_loss",
            "Validation loss of the latest state packet",
            ["run"],
            registry=registry,
        )

    def record_telemetry(self, packet: leyline_pb2.TelemetryPacket) -> list[tuple[str, float]]:
        """Update a gauge per metric point; return the (name, value) samples seen."""
        source = packet.source_subsystem or "unknown"
        self.packets.labels(source=source).inc()
        samples: list[tuple[str, float]] = []
        for point in packet.metrics:
            samples.append((point.name, point.value))
            gauge = self._gauge(sanitize_metric_name(point.name))
            if gauge is None:
                self.dropped_series.inc()
                continue
            gauge.labels(source=source).set(point.value)
        return samples

    def record_state(self, state: leyline_pb2.SystemStatePacket) -> None:
        run = state.training_run_id or "unknown"
        self.states.labels(run=run).inc()
        self.validation_accuracy.labels(run=run).set(state.validation_accuracy)
        self.validation_loss.labels(run=run).set(state.validation_loss)

    def record_field_report(self, report: leyline_pb2.FieldReport) -> None:
        outcome = leyline_pb2.FieldReportOutcome.Name(report.outcome)
        self.field_reports.labels(outcome=outcome.removeprefix("FIELD_REPORT_OUTCOME_").lower()).inc()

    def record_command(self, command: leyline_pb2.AdaptationCommand) -> None:
        kind = leyline_pb2.CommandType.Name(command.command_type).removeprefix("COMMAND_").lower()
        self.commands.labels(type=kind).inc()

    def _gauge(self, name: str) -> Gauge | None:
        if name in self._gauges:
            return self._gauges[name]
        if name in self._refused or len(self._gauges) >= self._max_series:
            return None
        try:
            gauge = Gauge(name, f"Platform metric {name}", ["source"], registry=self.registry)
        except ValueError:
            # The sanitised name collides with one of Nissa's own series.
            self._refused.add(name)
            return None
        self._gauges[name] = gauge
        return gauge
