"""The alert rules and dashboards name only metrics that a live control plane and Nissa really emit."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from _observability_support import (
    SECRET,
    nissa,
    replica_settings,
    series_of,
    weatherlight,
)
from _promql_names import ALERTS, DASHBOARDS, metric_names, panel_expressions, referenced, rule_expressions
from prometheus_client.parser import text_string_to_metric_families
from weatherlight._service_support import http_get

from esper.kasmina import KasminaSeedManager
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tolaria.packets import seed_summaries, state_packet, telemetry_packet
from esper.tolaria.records import EpochMeasures, Evaluation, TrainStats

#: Series Prometheus makes itself for every target; no exporter emits them.
PROMETHEUS_SERIES = frozenset({"up"})
#: Declared on every scrape, but a series appears only after an event this test does not cause
#: (entries lost unread, a refused commit or publish, a command or field report from Tamiyo,
#: a sample Nissa drops at a limit).
ONLY_AFTER_RARE_EVENTS = frozenset(
    {
        "oona_trimmed_unread_total",
        "oona_commit_failures_total",
        "oona_publish_failed_total",
        "esper_adaptation_commands_total",
        "esper_field_reports_total",
        "esper_nissa_dropped_samples_total",
    }
)
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created", ""),
    "info": ("_info",),
}


def exposed(text: str) -> tuple[set[str], set[str]]:
    """(every name a family in ``text`` declares, the names that have samples)."""
    declared: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        declared.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        sampled.update(sample.name for sample in family.samples)
    return declared | sampled, sampled


def test_the_name_extraction_sees_through_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stream) (rate(oona_handler_latency_seconds_bucket{job="x",'
        ' stream=~"oona.*"}[$__rate_interval]))) > 0.05 and on (instance) up offset 5m'
        " or time() - max without (source) (esper_telemetry_last_seen_seconds) > 1e3"
    )
    assert metric_names(expr) == {
        "oona_handler_latency_seconds_bucket",
        "up",
        "esper_telemetry_last_seen_seconds",
    }
    assert metric_names("count(esper_weatherlight_worker_up == 0) or vector(0)") == {
        "esper_weatherlight_worker_up"
    }
    alerts = dict(rule_expressions())
    assert "EsperRequiredWorkerDown" in alerts
    assert "EsperReplicaSilent" in alerts
    assert DASHBOARDS, "no dashboard in infra/grafana"
    titles = {title for path in DASHBOARDS for title, _ in panel_expressions(path)}
    assert {"Prefetch latency", "Pending per group", "Validation loss by run"} <= titles


async def _reply_to(client: OonaClient, request_id: str) -> None:
    """Block on the kernel error stream until the reply to ``request_id`` is there."""
    last = "0-0"
    while True:
        reply: Any = await client.redis.xread({"oona.kernels.errors": last}, block=1000)
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id.decode()
                envelope = L.BusEnvelope()
                envelope.ParseFromString(fields[b"payload"])
                error = L.KernelArtifactError()
                error.ParseFromString(envelope.payload)
                if error.request_id == request_id:
                    return


async def test_every_alert_and_panel_metric_is_emitted(
    redis_url: str, tmp_path: Path, isolated_env: Path
) -> None:
    async with (
        nissa(redis_url) as live,
        weatherlight(replica_settings(tmp_path, redis_url, "a")) as service,
        OonaClient(redis_url, StreamConfig(instance="trainer-o"), KeyRing(SECRET.encode())) as trainer,
    ):
        # A prefetch request (answered with an error: the catalogue is empty) and an unsigned entry.
        request = L.KernelPrefetchRequest(request_id="obs-1", blueprint_id="BP404", training_run_id="run-o")
        assert await trainer.publish_kernel_prefetch_request(request)
        await trainer.redis.xadd("oona.kernels.requests", {b"payload": b"\x00garbage", b"signature": b"x"})
        # A training epoch's packets, built by Tolaria and Kasmina themselves; a kernel to warm.
        manager = KasminaSeedManager(keys=KeyRing(SECRET.encode()))
        measures = EpochMeasures(
            TrainStats(0.9, 0.5, 1.2, 1000.0, 64), Evaluation(0.8, 0.55, {}, 64), 3.0, 120
        )
        state = state_packet(
            manager,
            measures,
            training_run_id="run-o",
            experiment_name="observability",
            epoch=1,
            global_step=8,
            device=torch.device("cpu"),
        )
        assert await trainer.publish_state(state)
        epoch = telemetry_packet(measures, seed_summaries(manager), training_run_id="run-o", epoch=1)
        assert await trainer.publish_telemetry(epoch)
        assert await trainer.publish_telemetry(manager.build_telemetry())
        assert await trainer.publish_kernel_catalog_update(L.KernelCatalogUpdate(blueprint_id="BP404"))
        await _reply_to(trainer, "obs-1")

        def traffic_seen() -> bool:
            samples = live.samples()
            oona = {"source": "oona", "instance": service.instance or ""}
            return all(
                (
                    series_of(samples, "esper_tolaria_training_loss"),
                    series_of(samples, "esper_kasmina_seeds_active"),
                    series_of(samples, "esper_kasmina_warm_failures_total"),
                    series_of(samples, "esper_training_validation_loss", run="run-o"),
                    series_of(samples, "esper_telemetry_last_seen_seconds", source="weatherlight"),
                    # The replica's own counters, as its next packet reports them.
                    any(v >= 1 for v in series_of(samples, "esper_oona_deadletter_total", **oona).values()),
                    any(
                        v >= 1
                        for v in series_of(samples, "esper_oona_rejected_bad_signature", **oona).values()
                    ),
                )
            )

        await live.watch.until(traffic_seen, "the test's traffic")
        code, control_plane = await http_get(service.http.port, "/metrics", timeout_s=10.0)
        assert code == 200
        code, nissa_text = await http_get(live.service.port, "/metrics", timeout_s=10.0)
        assert code == 200

    declared, sampled = exposed(control_plane)
    nissa_declared, nissa_sampled = exposed(nissa_text)
    declared |= nissa_declared
    sampled |= nissa_sampled
    used = referenced()
    assert len(used) >= 25, sorted(used)
    never = {name: sorted(where) for name, where in used.items() if name not in declared | PROMETHEUS_SERIES}
    assert not never, f"named by rules or panels but never emitted: {never}"
    silent = {name for name in used if name not in sampled | PROMETHEUS_SERIES}
    assert silent <= ONLY_AFTER_RARE_EVENTS, (
        f"no series after the test's traffic: {silent - ONLY_AFTER_RARE_EVENTS}"
    )
    # The traffic made what the rules watch for.
    assert {
        "oona_rejected_total",
        "oona_dead_letters_total",
        "urza_prefetch_latency_seconds_bucket",
    } <= sampled


def test_dashboards_are_importable() -> None:
    """Grafana's import needs unique panel ids, a grid position and a query per panel."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"]
        assert dashboard["title"]
        panels = dashboard["panels"]
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), path.name
        for panel in panels:
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert [t for t in panel["targets"] if t["expr"].strip()], panel["title"]


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian package 'prometheus'; no pip-installable promtool exists); "
            "the rule names are still checked against a live scrape"
        )
    checks = (
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(ALERTS.with_name("prometheus.yml"))],
        ["test", "rules", str(ALERTS.with_name("alerts_test.yml"))],  # the rules fire when they should
    )
    for args in checks:
        checked = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60, check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
