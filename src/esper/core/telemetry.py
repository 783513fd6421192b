"""One-call construction of Leyline ``TelemetryPacket``s.

Every subsystem reports through the same packet shape; building it in one
place keeps metric units, event numbering and health fields consistent.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from esper.leyline import leyline_pb2


@dataclass(frozen=True, slots=True)
class TelemetryMetric:
    name: str
    value: float
    unit: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TelemetryEvent:
    description: str
    level: leyline_pb2.TelemetryLevel.ValueType = leyline_pb2.TELEMETRY_LEVEL_INFO
    attributes: Mapping[str, str] = field(default_factory=dict)
    event_id: str | None = None


def build_telemetry_packet(
    *,
    source: str,
    metrics: Iterable[TelemetryMetric] = (),
    events: Iterable[TelemetryEvent] = (),
    level: leyline_pb2.TelemetryLevel.ValueType = leyline_pb2.TELEMETRY_LEVEL_INFO,
    health_status: leyline_pb2.HealthStatus.ValueType = leyline_pb2.HEALTH_STATUS_HEALTHY,
    health_summary: str = "",
    health_indicators: Mapping[str, str] | None = None,
    packet_id: str | None = None,
    timestamp: datetime | None = None,
) -> leyline_pb2.TelemetryPacket:
    """Build a packet; ids default to ``<source>-<uuid4 hex>`` and ``evt-<n>``."""
    packet = leyline_pb2.TelemetryPacket(
        packet_id=packet_id or f"{source}-{uuid.uuid4().hex}",
        source_subsystem=source,
        level=level,
    )
    packet.timestamp.FromDatetime(timestamp or datetime.now(UTC))
    for metric in metrics:
        point = packet.metrics.add(name=metric.name, value=float(metric.value))
        if metric.unit:
            point.unit = metric.unit
        point.attributes.update(metric.attributes)
    for index, event in enumerate(events, start=1):
        proto_event = packet.events.add(
            event_id=event.event_id or f"evt-{index}",
            description=event.description,
            level=event.level,
        )
        proto_event.attributes.update(event.attributes)
    packet.system_health.status = health_status
    packet.system_health.summary = health_summary
    if health_indicators:
        packet.system_health.indicators.update(health_indicators)
    return packet


#: ``system_health.indicators`` key in which a packet names the priority it wants.
PRIORITY_INDICATOR = "priority"
#: ``system_health.indicators`` key naming the replica (its instance name) that published the packet.
INSTANCE_INDICATOR = "instance"


def stamp_instance(packet: leyline_pb2.TelemetryPacket, instance: str) -> leyline_pb2.TelemetryPacket:
    """Name the publishing replica in ``packet`` (in place; returned for chaining).

    Replicas publish packets with identical sources and metric names; without
    the instance, a consumer such as Nissa would fold them into one series
    that flips between the replicas' values. Leyline has no field for it, so
    it rides in ``system_health.indicators``, next to the priority.
    """
    if instance:
        packet.system_health.indicators[INSTANCE_INDICATOR] = instance
    return packet


def packet_instance(packet: leyline_pb2.TelemetryPacket) -> str:
    """The instance name ``packet`` was stamped with, or ``""``."""
    return packet.system_health.indicators.get(INSTANCE_INDICATOR, "").strip()


def indicated_priority(packet: leyline_pb2.TelemetryPacket) -> leyline_pb2.MessagePriority.ValueType:
    """The priority a packet asks for (``HIGH`` or ``MESSAGE_PRIORITY_HIGH``); NORMAL if absent or invalid.

    Forwarders (Tolaria for Kasmina's packets, Weatherlight for its warmer's)
    publish each packet at this priority, so urgency is decided per packet.
    """
    raw = packet.system_health.indicators.get(PRIORITY_INDICATOR, "").strip().upper()
    if not raw:
        return leyline_pb2.MESSAGE_PRIORITY_NORMAL
    name = raw if raw.startswith("MESSAGE_PRIORITY_") else f"MESSAGE_PRIORITY_{raw}"
    try:
        return leyline_pb2.MessagePriority.Value(name)
    except ValueError:
        return leyline_pb2.MESSAGE_PRIORITY_NORMAL
