from __future__ import annotations

from collections.abc import Callable

from esper.core.telemetry import TelemetryEvent
from esper.kasmina import KasminaSeedManager
from esper.leyline import leyline_pb2 as L

from .conftest import make_host


async def test_packet_contents(make_manager: Callable[..., KasminaSeedManager]) -> None:
    manager = make_manager()
    manager.register_host_model(make_host())
    await manager.germinate("2", "BP100")
    packet = manager.build_telemetry()
    assert packet.source_subsystem == "kasmina"
    metrics = {m.name: m.value for m in packet.metrics}
    for name in (
        "kasmina.seeds.active",
        "kasmina.isolation.violations",
        "kasmina.kernel.fetch_latency_ms",
        "kasmina.breaker.state",
        "kasmina.cache.kernel_size",
        "kasmina.cache.kernel_hit_rate",
        "kasmina.telemetry.dropped_total",
    ):
        assert name in metrics, name
    assert metrics["kasmina.seeds.active"] == 1
    assert metrics["kasmina.kernel.fetch_latency_ms"] == 1.0
    assert metrics["kasmina.breaker.state"] == L.CIRCUIT_STATE_CLOSED
    [stage] = [e for e in packet.events if e.description == "seed_stage"]
    assert dict(stage.attributes) == {"seed_id": "2", "stage": "TRAINING", "alpha": "0.0000"}
    assert packet.system_health.status == L.HEALTH_STATUS_HEALTHY


def test_priority_is_per_packet_not_sticky(make_manager: Callable[..., KasminaSeedManager]) -> None:
    manager = make_manager()
    levels = [
        (TelemetryEvent("x", L.TELEMETRY_LEVEL_CRITICAL), "CRITICAL"),
        (None, "NORMAL"),
        (TelemetryEvent("y", L.TELEMETRY_LEVEL_WARNING), "HIGH"),
        (TelemetryEvent("z", L.TELEMETRY_LEVEL_ERROR), "HIGH"),
        (TelemetryEvent("i", L.TELEMETRY_LEVEL_INFO), "NORMAL"),
    ]
    for event, expected in levels:
        packet = manager.build_telemetry([event] if event else [])
        assert packet.system_health.indicators["priority"] == expected


def test_buffer_is_bounded_and_counts_drops(make_manager: Callable[..., KasminaSeedManager]) -> None:
    manager = make_manager(telemetry_buffer_size=3)
    ids = [manager.build_telemetry().packet_id for _ in range(5)]
    assert manager.telemetry_dropped == 2
    last = manager.build_telemetry()
    # the packet reports the drops that happened before it was buffered
    assert {m.name: m.value for m in last.metrics}["kasmina.telemetry.dropped_total"] == 2
    assert manager.telemetry_dropped == 3
    drained = manager.drain_telemetry()
    assert [p.packet_id for p in drained] == [ids[3], ids[4], last.packet_id]
    assert manager.drain_telemetry() == []
