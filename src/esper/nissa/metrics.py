"""Turn bus traffic into Prometheus series, labelled by source and instance.

Every ``MetricPoint`` of a ``TelemetryPacket`` becomes a gauge named after the
metric (sanitised to Prometheus rules and prefixed ``esper_``) with two
labels: ``source`` (the packet's subsystem) and ``instance`` (the replica
that published it), so ``weatherlight.uptime_s`` from replica
``weatherlight-1`` becomes
``esper_weatherlight_uptime_s{instance="weatherlight-1",source="weatherlight"}``
(Prometheus text lists labels in name order).

The instance is the one the packet was stamped with
(:func:`esper.core.telemetry.stamp_instance`); a packet without one, and
every state packet, field report and command, is labelled with the signed
``source`` of its bus envelope (the publishing client's consumer name), or
``""`` when there is none. Replicas publish identical metric names, so
without the label their values would overwrite each other in one series;
with it, ``sum without (instance)`` adds them up correctly.

All of these series live in one :class:`~esper.nissa.series.SeriesStore`
and share its limits.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import lru_cache

from prometheus_client import CollectorRegistry

from esper.core.telemetry import packet_instance
from esper.leyline import leyline_pb2
from esper.nissa.series import SeriesLimits, SeriesStore

_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_PLATFORM = ("source", "instance")


@lru_cache(maxsize=4096)
def sanitize_metric_name(name: str) -> str:
    """Map a dotted platform metric name onto ``[a-zA-Z_][a-zA-Z0-9_]*``."""
    cleaned = _INVALID.sub("_", name.strip()).strip("_") or "unnamed"
    if cleaned[0].isdigit():
        cleaned = f"_{cleaned}"
    return f"esper_{cleaned}"


def packet_labels(packet: leyline_pb2.TelemetryPacket, sender: str = "") -> tuple[str, str]:
    """``(source, instance)`` of a telemetry packet (see the module docstring)."""
    return packet.source_subsystem or "unknown", packet_instance(packet) or sender


class TelemetryMetrics:
    """Prometheus view of everything Nissa has consumed.

    ``sender`` arguments are the envelope's signed ``source`` attribute.
    ``wall_clock`` stamps ``esper_telemetry_last_seen_seconds``.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        limits: SeriesLimits | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.store = SeriesStore(registry, limits, clock=clock)
        self._wall_clock = wall_clock
        declare = self.store.declare
        declare("esper_telemetry_packets", "Telemetry packets consumed", "counter", _PLATFORM)
        declare(
            "esper_telemetry_last_seen_seconds",
            "When Nissa last received a telemetry packet from this source and instance (Unix time)",
            "gauge",
            _PLATFORM,
        )
        declare("esper_system_state_packets", "System state packets consumed", "counter", ("run", "instance"))
        declare("esper_field_reports", "Field reports consumed", "counter", ("outcome", "instance"))
        declare(
            "esper_adaptation_commands",
            "Adaptation commands seen on the bus",
            "counter",
            ("type", "instance"),
        )
        declare(
            "esper_training_validation_accuracy",
            "Validation accuracy of the latest state packet",
            "gauge",
            ("run", "instance"),
        )
        declare(
            "esper_training_validation_loss",
            "Validation loss of the latest state packet",
            "gauge",
            ("run", "instance"),
        )

    def record_telemetry(
        self, packet: leyline_pb2.TelemetryPacket, sender: str = ""
    ) -> list[tuple[str, float]]:
        """Update a gauge per metric point; return the (name, value) samples that became series."""
        labels = packet_labels(packet, sender)
        store = self.store
        store.inc("esper_telemetry_packets", labels)
        store.set("esper_telemetry_last_seen_seconds", labels, self._wall_clock())
        samples: list[tuple[str, float]] = []
        longest = store.limits.max_name_length
        for point in packet.metrics:
            if len(point.name) > longest:
                store.drop("name_too_long", "", point.name)
                continue
            name = sanitize_metric_name(point.name)
            if store.gauge(name, f"Platform metric {point.name}", _PLATFORM, labels, point.value):
                samples.append((point.name, point.value))
        return samples

    def record_state(self, state: leyline_pb2.SystemStatePacket, sender: str = "") -> None:
        labels = (state.training_run_id or "unknown", sender)
        self.store.inc("esper_system_state_packets", labels)
        self.store.set("esper_training_validation_accuracy", labels, state.validation_accuracy)
        self.store.set("esper_training_validation_loss", labels, state.validation_loss)

    def record_field_report(self, report: leyline_pb2.FieldReport, sender: str = "") -> None:
        outcome = leyline_pb2.FieldReportOutcome.Name(report.outcome)
        labels = (outcome.removeprefix("FIELD_REPORT_OUTCOME_").lower(), sender)
        self.store.inc("esper_field_reports", labels)

    def record_command(self, command: leyline_pb2.AdaptationCommand, sender: str = "") -> None:
        kind = leyline_pb2.CommandType.Name(command.command_type).removeprefix("COMMAND_").lower()
        self.store.inc("esper_adaptation_commands", (kind, sender))
