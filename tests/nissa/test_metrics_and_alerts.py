from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from esper.core import TelemetryMetric, build_telemetry_packet
from esper.core.telemetry import stamp_instance
from esper.leyline import leyline_pb2
from esper.nissa.alerts import AlertEngine, AlertRule
from esper.nissa.metrics import TelemetryMetrics, sanitize_metric_name
from esper.nissa.series import SeriesLimits


class Clock:
    """A clock the test moves by hand (monotonic seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return samples(registry).get((name, tuple(sorted(labels.items()))))


def packet(source: str, *metrics: tuple[str, float], instance: str = "") -> leyline_pb2.TelemetryPacket:
    built = build_telemetry_packet(source=source, metrics=[TelemetryMetric(n, v) for n, v in metrics])
    return stamp_instance(built, instance)


def test_sanitize_metric_names() -> None:
    assert sanitize_metric_name("weatherlight.uptime_s") == "esper_weatherlight_uptime_s"
    assert sanitize_metric_name("oona.pending.oona-normal") == "esper_oona_pending_oona_normal"
    assert sanitize_metric_name("9lives") == "esper__9lives"
    assert sanitize_metric_name("...") == "esper_unnamed"


def test_every_metric_becomes_a_series_labelled_by_source_and_instance() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry, wall_clock=lambda: 1234.5)
    seen = metrics.record_telemetry(
        packet(
            "weatherlight",
            ("weatherlight.uptime_s", 12.5),
            ("oona.pending.oona.normal", 3),
            instance="weatherlight-1",
        )
    )
    assert seen == [("weatherlight.uptime_s", 12.5), ("oona.pending.oona.normal", 3.0)]
    text = generate_latest(registry).decode()
    assert 'esper_weatherlight_uptime_s{instance="weatherlight-1",source="weatherlight"} 12.5' in text
    assert 'esper_oona_pending_oona_normal{instance="weatherlight-1",source="weatherlight"} 3.0' in text
    assert 'esper_telemetry_packets_total{instance="weatherlight-1",source="weatherlight"} 1.0' in text
    assert 'esper_telemetry_last_seen_seconds{instance="weatherlight-1",source="weatherlight"} 1234.5' in text


def test_replicas_stay_apart_and_unstamped_packets_fall_back_to_the_sender() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    metrics.record_telemetry(packet("oona", ("oona.published.x", 5), instance="weatherlight-1"))
    metrics.record_telemetry(packet("oona", ("oona.published.x", 7), instance="weatherlight-2"))
    metrics.record_telemetry(packet("oona", ("oona.published.x", 7), instance="weatherlight-2"))
    metrics.record_telemetry(packet("tolaria", ("tolaria.training.loss", 0.4)), sender="demo-trainer")
    metrics.record_telemetry(packet("tolaria", ("tolaria.training.loss", 0.9)))
    # A forwarded packet keeps the instance it was stamped with.
    metrics.record_telemetry(packet("kasmina", ("kasmina.seeds.active", 1), instance="t-7"), sender="fwd")
    assert value(registry, "esper_oona_published_x", source="oona", instance="weatherlight-1") == 5
    assert value(registry, "esper_oona_published_x", source="oona", instance="weatherlight-2") == 7
    assert value(registry, "esper_telemetry_packets_total", source="oona", instance="weatherlight-2") == 2
    assert value(registry, "esper_tolaria_training_loss", source="tolaria", instance="demo-trainer") == 0.4
    assert value(registry, "esper_tolaria_training_loss", source="tolaria", instance="") == 0.9
    assert value(registry, "esper_kasmina_seeds_active", source="kasmina", instance="t-7") == 1


def test_states_reports_and_commands_are_counted_per_sender() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    metrics.record_state(
        leyline_pb2.SystemStatePacket(training_run_id="run-1", validation_accuracy=0.9, validation_loss=0.3),
        "trainer-a",
    )
    metrics.record_field_report(
        leyline_pb2.FieldReport(outcome=leyline_pb2.FIELD_REPORT_OUTCOME_SUCCESS), "weatherlight-2"
    )
    metrics.record_command(leyline_pb2.AdaptationCommand(command_type=leyline_pb2.COMMAND_SEED))
    assert value(registry, "esper_system_state_packets_total", run="run-1", instance="trainer-a") == 1
    accuracy = value(registry, "esper_training_validation_accuracy", run="run-1", instance="trainer-a")
    assert accuracy == pytest.approx(0.9)
    loss = value(registry, "esper_training_validation_loss", run="run-1", instance="trainer-a")
    assert loss == pytest.approx(0.3)
    assert value(registry, "esper_field_reports_total", outcome="success", instance="weatherlight-2") == 1
    assert value(registry, "esper_adaptation_commands_total", type="seed", instance="") == 1


def test_label_values_are_capped_and_drops_counted_and_logged_rate_limited() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    metrics = TelemetryMetrics(registry, SeriesLimits(max_label_values=3, log_every_s=60), clock=clock)
    with capture_logs() as logs:
        for n in range(10):
            metrics.record_telemetry(packet(f"src-{n}", ("m.a", n), ("m.b", n)))
        clock.now += 61
        metrics.record_telemetry(packet("src-late", ("m.a", 1)))
    shown = {labels for name, labels in samples(registry) if name == "esper_m_a"}
    assert shown == {(("instance", ""), ("source", f"src-{n}")) for n in range(3)}
    assert metrics.store.values_of("source") == 3
    # Each refused packet loses its packet count, its last-seen time and its metrics.
    assert (
        value(registry, "esper_nissa_dropped_samples_total", reason="label_values", label="source")
        == 7 * 4 + 3
    )
    dropped = [e for e in logs if e["event"] == "nissa.samples_dropped"]
    assert [(e["reason"], e["label"], e["dropped"]) for e in dropped] == [
        ("label_values", "source", 1),
        ("label_values", "source", 7 * 4),  # the 27 not logged yet, and the first of src-late
    ]
    assert dropped[0]["example"] == "src-3"


def test_the_series_count_is_capped() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry, SeriesLimits(max_series=50))
    for n in range(40):
        metrics.record_telemetry(packet("kasmina", *((f"kasmina.metric_{n}_{k}", k) for k in range(5))))
    assert metrics.store.series_count == 50
    assert value(registry, "esper_nissa_series") == 50
    assert value(registry, "esper_nissa_series_limit") == 50
    platform = [name for name, _ in samples(registry) if name.startswith("esper_kasmina_")]
    assert len(platform) == 48  # the packet counter and the last-seen gauge hold the other two
    assert value(registry, "esper_nissa_dropped_samples_total", reason="series_limit", label="") == 200 - 48
    # A series that exists keeps updating at the limit.
    metrics.record_telemetry(packet("kasmina", ("kasmina.metric_0_0", 99)))
    assert value(registry, "esper_kasmina_metric_0_0", source="kasmina", instance="") == 99


def test_twenty_thousand_sources_stay_within_the_limits() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry)
    names = [f"weatherlight.metric_{k}" for k in range(7)]
    for n in range(20_000):
        metrics.record_telemetry(packet(f"source-{n}", *((name, n) for name in names)))
    limits = metrics.store.limits
    assert metrics.store.values_of("source") == limits.max_label_values
    assert metrics.store.series_count == limits.max_label_values * 9 <= limits.max_series
    dropped = value(registry, "esper_nissa_dropped_samples_total", reason="label_values", label="source")
    assert dropped == (20_000 - limits.max_label_values) * 9


def test_long_values_are_cut_and_long_or_colliding_names_dropped() -> None:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry, SeriesLimits(max_value_length=8, max_name_length=30))
    metrics.record_telemetry(
        packet(
            "x" * 50,
            ("ok", 1),
            ("n" * 31, 2),
            ("telemetry_packets_total", 3),
            ("nissa.series", 4),
            ("system_state_packets", 5),
        )
    )
    assert value(registry, "esper_ok", source="x" * 8, instance="") == 1
    assert value(registry, "esper_nissa_dropped_samples_total", reason="name_too_long", label="") == 1
    assert value(registry, "esper_nissa_dropped_samples_total", reason="name_collision", label="") == 3
    assert value(registry, "esper_telemetry_packets_total", source="x" * 8, instance="") == 1


def test_idle_series_are_forgotten_and_free_their_label_values() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    metrics = TelemetryMetrics(registry, SeriesLimits(max_label_values=2, idle_ttl_s=600), clock=clock)
    metrics.record_state(leyline_pb2.SystemStatePacket(training_run_id="run-1"), "t")
    metrics.record_state(leyline_pb2.SystemStatePacket(training_run_id="run-2"), "t")
    metrics.record_state(leyline_pb2.SystemStatePacket(training_run_id="run-3"), "t")  # over the limit
    assert value(registry, "esper_system_state_packets_total", run="run-3", instance="t") is None
    clock.now += 400
    metrics.record_state(leyline_pb2.SystemStatePacket(training_run_id="run-2"), "t")  # run-2 stays fresh
    clock.now += 300
    assert value(registry, "esper_system_state_packets_total", run="run-1", instance="t") is None
    metrics.record_state(leyline_pb2.SystemStatePacket(training_run_id="run-3"), "t")
    assert value(registry, "esper_system_state_packets_total", run="run-2", instance="t") == 2
    assert value(registry, "esper_system_state_packets_total", run="run-3", instance="t") == 1
    assert value(registry, "esper_nissa_expired_series_total") == 3  # run-1's counter and two gauges


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


def test_series_and_replicas_are_tracked_independently() -> None:
    engine = AlertEngine(rules=(AlertRule("r", "weatherlight.worker.*.restarts", threshold=3),))
    engine.observe(
        "weatherlight", [("weatherlight.worker.a.restarts", 4), ("weatherlight.worker.b.restarts", 1)]
    )
    assert [a.metric for a in engine.active()] == ["weatherlight.worker.a.restarts"]
    assert engine.observe("weatherlight", [("unrelated.metric", 100)]) == []
    # Another replica's healthy value does not clear the first replica's alert.
    engine.observe("weatherlight", [("weatherlight.worker.a.restarts", 0)], "weatherlight-2")
    assert [(a.instance, a.metric) for a in engine.active()] == [("", "weatherlight.worker.a.restarts")]


def test_entries_trimmed_unread_raise_the_default_critical_alert() -> None:
    engine = AlertEngine()  # the default rules
    assert engine.observe("oona", [("oona.trimmed_unread.total", 0.0)], "weatherlight-0") == []
    [alert] = engine.observe("oona", [("oona.trimmed_unread.total", 12.0)], "weatherlight-0")
    assert alert.rule == "oona_trimmed_unread"
    assert alert.severity == "critical"
