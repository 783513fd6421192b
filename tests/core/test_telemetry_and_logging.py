from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

import pytest

from esper.core import TelemetryEvent, TelemetryMetric, build_telemetry_packet, configure_logging, get_logger
from esper.leyline import leyline_pb2


def test_packet_built_in_one_call() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    packet = build_telemetry_packet(
        source="kasmina",
        packet_id="p-1",
        level=leyline_pb2.TELEMETRY_LEVEL_WARNING,
        metrics=[
            TelemetryMetric("kasmina.seeds.active", 2, unit="count", attributes={"seed": "s1"}),
            TelemetryMetric("plain", 1.5),
        ],
        events=[
            TelemetryEvent("seed_stage", attributes={"stage": "TRAINING"}),
            TelemetryEvent("gate_failure", level=leyline_pb2.TELEMETRY_LEVEL_ERROR, event_id="custom"),
        ],
        health_status=leyline_pb2.HEALTH_STATUS_DEGRADED,
        health_summary="fallback",
        health_indicators={"priority": "HIGH"},
        timestamp=stamp,
    )
    assert packet.packet_id == "p-1"
    assert packet.source_subsystem == "kasmina"
    assert packet.level == leyline_pb2.TELEMETRY_LEVEL_WARNING
    assert packet.timestamp.ToDatetime(tzinfo=UTC) == stamp
    assert [(m.name, m.value, m.unit) for m in packet.metrics] == [
        ("kasmina.seeds.active", 2.0, "count"),
        ("plain", 1.5, ""),
    ]
    assert dict(packet.metrics[0].attributes) == {"seed": "s1"}
    assert [e.event_id for e in packet.events] == ["evt-1", "custom"]
    assert packet.events[1].level == leyline_pb2.TELEMETRY_LEVEL_ERROR
    assert packet.system_health.status == leyline_pb2.HEALTH_STATUS_DEGRADED
    assert dict(packet.system_health.indicators) == {"priority": "HIGH"}


def test_default_ids_and_timestamp() -> None:
    before = datetime.now(UTC)
    packet = build_telemetry_packet(source="oona")
    assert packet.packet_id.startswith("oona-")
    assert packet.packet_id != build_telemetry_packet(source="oona").packet_id
    assert packet.timestamp.ToDatetime(tzinfo=UTC) >= before.replace(microsecond=0)


def test_json_logging_emits_parseable_lines(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json")
    get_logger("esper.test").info("hello", answer=42)
    get_logger("esper.test").debug("hidden")
    logging.getLogger("stdlib").warning("plain %s", "message")
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert lines[0]["event"] == "hello"
    assert lines[0]["answer"] == 42
    assert lines[0]["level"] == "info"
    assert lines[1]["event"] == "plain message"
    assert len(lines) == 2


def test_console_logging_respects_level(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("WARNING", "console")
    get_logger("esper.test").info("quiet")
    get_logger("esper.test").warning("loud")
    err = capsys.readouterr().err
    assert "loud" in err
    assert "quiet" not in err


def test_indicated_priority_reads_the_packet_own_indicator() -> None:
    from esper.core.telemetry import indicated_priority

    def packet(value: str | None) -> leyline_pb2.TelemetryPacket:
        return build_telemetry_packet(
            source="x", health_indicators=None if value is None else {"priority": value}
        )

    assert indicated_priority(packet(None)) == leyline_pb2.MESSAGE_PRIORITY_NORMAL
    assert indicated_priority(packet("high")) == leyline_pb2.MESSAGE_PRIORITY_HIGH
    assert indicated_priority(packet("MESSAGE_PRIORITY_CRITICAL")) == leyline_pb2.MESSAGE_PRIORITY_CRITICAL
    assert indicated_priority(packet("urgent!")) == leyline_pb2.MESSAGE_PRIORITY_NORMAL
