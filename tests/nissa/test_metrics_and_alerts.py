from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from esper.core import TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2
from esper.nissa.alerts import AlertEngine, AlertRule
from esper.nissa.metrics import TelemetryMetrics, sanitize_metric_name


def test_sanitize_metric_names() -> None:
    assert sanitize_metric_name("weatherlight.uptime_s") == "esper_weatherlight_uptime_s"
    assert sanitize_metric_name("oona.pending.oona-normal") == "esper_oona_pending_oona_normal"
    assert sanitize_metric_name("9lives") == "esper__9lives"
    assert sanitize_metric_name("...") == "esper_unnamed"


def test_every_metric_becomes_a_labelled_series() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    packet = build_telemetry_packet(
        source="weatherlight",
        metrics=[
            TelemetryMetric("weatherlight.uptime_s", 12.5),
            TelemetryMetric("oona.pending.oona.normal", 3),
        ],
    )
    samples = metrics.record_telemetry(packet)
    assert samples == [("weatherlight.uptime_s", 12.5), ("oona.pending.oona.normal", 3.0)]
    text = generate_latest(registry).decode()
    assert 'esper_weatherlight_uptime_s{source="weatherlight"} 12.5' in text
    assert 'esper_oona_pending_oona_normal{source="weatherlight"} 3.0' in text
    assert 'esper_telemetry_packets_total{source="weatherlight"} 1.0' in text


def test_colliding_or_excess_series_are_dropped_not_fatal() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry, max_series=1)
    packet = build_telemetry_packet(
        source="x",
        metrics=[TelemetryMetric("telemetry_packets", 1), TelemetryMetric("a", 1), TelemetryMetric("b", 2)],
    )
    metrics.record_telemetry(packet)
    text = generate_latest(registry).decode()
    assert 'esper_a{source="x"} 1.0' in text
    assert "esper_b{" not in text
    assert "esper_nissa_dropped_series_total 2.0" in text


def test_states_reports_and_commands_are_counted() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    metrics.record_state(
        leyline_pb2.SystemStatePacket(training_run_id="run-1", validation_accuracy=0.9, validation_loss=0.3)
    )
    metrics.record_field_report(leyline_pb2.FieldReport(outcome=leyline_pb2.FIELD_REPORT_OUTCOME_SUCCESS))
    metrics.record_command(leyline_pb2.AdaptationCommand(command_type=leyline_pb2.COMMAND_SEED))
    text = generate_latest(registry).decode()
    assert 'esper_system_state_packets_total{run="run-1"} 1.0' in text
    assert 'esper_training_validation_accuracy{run="run-1"}' in text
    assert 'esper_field_reports_total{outcome="success"} 1.0' in text
    assert 'esper_adaptation_commands_total{type="seed"} 1.0' in text


def test_alert_fires_after_consecutive_breaches_and_clears() -> None:
    engine = AlertEngine(rules=(AlertRule("depth", "oona.pending.*", threshold=10, for_count=2),))
    assert engine.observe("oona", [("oona.pending.oona.normal", 11)]) == []
    started = engine.observe("oona", [("oona.pending.oona.normal", 12)])
    assert [a.rule for a in started] == ["depth"]
    assert engine.observe("oona", [("oona.pending.oona.normal", 13)]) == []  # already firing
    assert engine.active()[0].value == 13
    engine.observe("oona", [("oona.pending.oona.normal", 1)])
    assert engine.active() == []
    assert engine.fired_total == 1


def test_series_are_tracked_independently() -> None:
    engine = AlertEngine(rules=(AlertRule("r", "weatherlight.worker.*.restarts", threshold=3),))
    engine.observe(
        "weatherlight", [("weatherlight.worker.a.restarts", 4), ("weatherlight.worker.b.restarts", 1)]
    )
    assert [a.metric for a in engine.active()] == ["weatherlight.worker.a.restarts"]
    assert engine.observe("weatherlight", [("unrelated.metric", 100)]) == []
