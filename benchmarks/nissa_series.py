"""Nissa's ``/metrics`` render time with 20 000 distinct sources, within the default limits and without.

Each source sends one packet with seven metrics (what a Weatherlight packet
looks like). Rendering runs on Nissa's event loop, so its time is how long
every consumer and probe waits while Prometheus scrapes. "unlimited" lifts
the limits to show what they prevent.

Run: .venv/bin/python benchmarks/nissa_series.py   (last line is JSON)
"""

from __future__ import annotations

import json
import os
import statistics
import time

from prometheus_client import CollectorRegistry, generate_latest

from esper.core import TelemetryMetric, build_telemetry_packet
from esper.core.telemetry import stamp_instance
from esper.nissa import SeriesLimits, TelemetryMetrics

SOURCES = int(os.environ.get("BENCH_SOURCES", "20000"))
RENDERS = 5
NAMES = [f"weatherlight.metric_{k}" for k in range(7)]


def run(limits: SeriesLimits) -> dict[str, float]:
    registry = CollectorRegistry()
    metrics = TelemetryMetrics(registry, limits)
    packets = [
        stamp_instance(
            build_telemetry_packet(source=f"source-{n}", metrics=[TelemetryMetric(m, n) for m in NAMES]),
            "weatherlight-1",
        )
        for n in range(SOURCES)
    ]
    began = time.perf_counter()
    for packet in packets:
        metrics.record_telemetry(packet)
    recorded_s = time.perf_counter() - began
    timings = []
    size = 0
    for _ in range(RENDERS):
        began = time.perf_counter()
        size = len(generate_latest(registry))
        timings.append(time.perf_counter() - began)
    return {
        "series": float(metrics.store.series_count),
        "render_ms_median": round(statistics.median(timings) * 1000, 1),
        "render_ms_max": round(max(timings) * 1000, 1),
        "body_kib": round(size / 1024, 1),
        "record_us_per_packet": round(recorded_s / SOURCES * 1e6, 1),
    }


def main() -> None:
    unlimited = SeriesLimits(max_series=10**9, max_label_values=10**9)
    report = {"sources": SOURCES, "limited": run(SeriesLimits()), "unlimited": run(unlimited)}
    for name in ("limited", "unlimited"):
        row = report[name]
        assert isinstance(row, dict)
        print(
            f"{name:>9}: {row['series']:>8.0f} series, /metrics {row['render_ms_median']} ms "
            f"(max {row['render_ms_max']}), {row['body_kib']} KiB, {row['record_us_per_packet']} us/packet"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
