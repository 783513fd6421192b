"""The demo run: Weatherlight (+ Nissa) as processes, a digits model grown through the bus, and baselines.

Steps: start Weatherlight on the embedded default (or ``REDIS_URL``) and wait
for its READY notification → connect with :func:`esper.grow.connect` and
forge the kernels Tamiyo may ask for (announced on the bus, so
Weatherlight's Kasmina warms them) → start Nissa → train a small MLP on
scikit-learn's bundled digits with seed slots, which the platform fills
whenever Tamiyo (inside Weatherlight) commands a graft → train the two
baselines of :mod:`esper.demo.baselines` → print the tables and the
summary, write a plot, check Nissa's metrics, stop everything.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

import esper.grow
from esper.core.redis_server import embedded_url
from esper.core.settings import EsperSettings, load_settings
from esper.demo.baselines import RunReport, train_baseline, width_for
from esper.demo.processes import ChildService, http_text, start_nissa, start_weatherlight
from esper.demo.report import plot_runs, print_comparison, print_epoch, print_header, print_runs
from esper.security import KeyRing
from esper.tezzeret.cli import ProgressLine
from esper.tolaria import SLOT_POINTS, build_host_model, load_digits_splits

EXPECTED_SOURCES = ("weatherlight", "tolaria", "kasmina", "oona")


@dataclass(frozen=True)
class DemoConfig:
    epochs: int = 8
    hidden: int = 32
    workdir: Path = Path("./var/demo")
    plot_path: Path | None = None
    redis_url: str | None = None
    with_nissa: bool = True
    limit: int | None = None
    command_wait_s: float = 5.0
    lr: float = 1e-2


@dataclass
class DemoSummary:
    """``runs`` are the grown run, then the host-only and the static baselines."""

    run_id: str
    runs: list[RunReport] = field(default_factory=list)
    no_graft_reason: str = ""
    plot_path: Path | None = None
    nissa_sources: set[str] = field(default_factory=set)
    elapsed_s: float = 0.0

    @property
    def grafts(self) -> list[str]:
        return self.runs[0].grafts if self.runs else []

    @property
    def succeeded(self) -> bool:
        return bool(self.grafts)


def _environment(config: DemoConfig, secret: str) -> dict[str, str]:
    var = (config.workdir / "var").resolve()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(
        ESPER_LEYLINE_SECRET=secret,
        ESPER_VAR_DIR=str(var),
        URZA_ARTIFACT_DIR=str(var / "urza" / "artifacts"),
        URZA_DATABASE_URL=f"sqlite:///{var / 'urza' / 'catalog.db'}",
        TAMIYO_POLICY_DIR=str(var / "tamiyo" / "policies"),
        WEATHERLIGHT_HTTP_PORT="0",
        WEATHERLIGHT_TELEMETRY_INTERVAL_S="1",
    )
    if config.redis_url:
        env["REDIS_URL"] = config.redis_url
    return env


def _secret(out: TextIO) -> str:
    """The configured secret (environment or ``.env``), else a one-off one for this run alone.

    The configured one is shared with every other tool started here (``esper-oona``
    can then verify and replay the demo's dead letters); a one-off one is not kept.
    """
    configured = load_settings().leyline_secret
    if configured is not None:
        return configured.get_secret_value()
    print("no ESPER_LEYLINE_SECRET set: using a one-off secret for this demo run", file=out)
    return secrets.token_hex(32)


def _settings(env: dict[str, str], redis_url: str) -> EsperSettings:
    return load_settings(
        redis_url=redis_url,
        leyline_secret=env["ESPER_LEYLINE_SECRET"],
        var_dir=env["ESPER_VAR_DIR"],
        urza_artifact_dir=env["URZA_ARTIFACT_DIR"],
        urza_database_url=env["URZA_DATABASE_URL"],
        tamiyo_policy_dir=env["TAMIYO_POLICY_DIR"],
    )


def _redis_url(config: DemoConfig, env: dict[str, str]) -> str:
    if config.redis_url:
        return config.redis_url
    return embedded_url(Path(env["ESPER_VAR_DIR"]))


def nissa_sources(metrics_text: str) -> set[str]:
    """Which expected platform components have series (metric prefix or source label) in Nissa."""
    seen: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            source = sample.labels.get("source", "")
            for name in EXPECTED_SOURCES:
                if source == name or sample.name.startswith(f"esper_{name}_"):
                    seen.add(name)
    return seen


async def run_demo(config: DemoConfig, out: TextIO = sys.stdout) -> DemoSummary:
    started = time.monotonic()
    env = _environment(config, _secret(out))
    logs = config.workdir / "logs"
    summary = DemoSummary(run_id=f"demo-{uuid.uuid4().hex[:8]}")
    children: list[ChildService] = []
    where = config.redis_url or "its own embedded Redis-protocol server"
    print(f"starting Weatherlight on {where} (logs in {logs})", file=out, flush=True)
    try:
        children.append(await start_weatherlight(env, logs / "weatherlight.log"))
        redis_url = _redis_url(config, env)
        env["REDIS_URL"] = redis_url
        settings = _settings(env, redis_url)
        async with esper.grow.connect(settings) as platform:
            print(
                f"forging {len(esper.grow.KERNELS)} kernels for width {config.hidden}: "
                f"{', '.join(esper.grow.KERNELS)}",
                file=out,
                flush=True,
            )
            report = await platform.prepare(config.hidden, progress=ProgressLine(out))
            print(
                f"forge: {len(report.compiled)} compiled, {len(report.skipped)} already in Urza",
                file=out,
                flush=True,
            )
            nissa_url = None
            if config.with_nissa:
                nissa, nissa_url = await start_nissa(env, logs / "nissa.log")
                children.append(nissa)
                print(f"Nissa serving Prometheus metrics at {nissa_url}/metrics", file=out, flush=True)
            await _grow(platform, config, summary, out)
        await _baselines(settings, config, summary, out)
        if nissa_url is not None:
            summary.nissa_sources = await _nissa_sources(nissa_url)
    finally:
        for child in reversed(children):
            await child.stop()
    summary.elapsed_s = time.monotonic() - started
    _print_summary(summary, config, out)
    return summary


async def _nissa_sources(url: str, attempts: int = 40) -> set[str]:
    """What Nissa has seen; telemetry is asynchronous, so give it a few seconds to catch up."""
    seen: set[str] = set()
    for _ in range(attempts):
        seen = nissa_sources(await asyncio.to_thread(http_text, f"{url}/metrics"))
        if seen >= set(EXPECTED_SOURCES):
            break
        await asyncio.sleep(0.25)
    return seen


async def _grow(platform: esper.grow.Platform, config: DemoConfig, summary: DemoSummary, out: TextIO) -> None:
    data = load_digits_splits(seed=0, limit=config.limit)
    model = build_host_model(
        data.features,
        data.classes,
        hidden=config.hidden,
        add_slots=platform.add_seeds,
        slots=SLOT_POINTS,
        seed=0,
    )
    print(
        f"training run {summary.run_id}: {data.train_size} training / {data.validation_size} held-out "
        f"digits; seed slots: {', '.join(SLOT_POINTS)}",
        file=out,
        flush=True,
    )
    print_header(out)
    run = await platform.train(
        model,
        data.train,
        data.validation,
        loss=F.cross_entropy,
        epochs=config.epochs,
        lr=config.lr,
        device="cpu",
        command_wait_s=config.command_wait_s,
        run_id=summary.run_id,
        on_epoch=lambda result: print_epoch(result, out),
    )
    summary.runs.append(RunReport("grown", run.results, run.elapsed_s, config.hidden, run.grafts))
    summary.no_graft_reason = run.no_graft_reason()


async def _baselines(settings: EsperSettings, config: DemoConfig, summary: DemoSummary, out: TextIO) -> None:
    """The host without growth, and a static host of the grown model's final size (same data and seed)."""
    grown = summary.runs[0]
    data = load_digits_splits(seed=0, limit=config.limit)
    static_hidden = width_for(grown.parameters, data.features, data.classes)
    keys = KeyRing(*settings.signing_secrets())
    print(
        f"\nbaselines: the host without growth (hidden {config.hidden}), and a static host of the grown "
        f"model's final size ({grown.parameters} parameters: hidden {static_hidden}), same data and seed",
        file=out,
        flush=True,
    )
    if static_hidden == config.hidden:
        print(
            f"(the grafts added {grown.parameters - grown.results[0].parameters} parameters, less than one "
            "hidden unit: the static host is the host itself)",
            file=out,
            flush=True,
        )
    for name, hidden in (("host only", config.hidden), (f"static, hidden {static_hidden}", static_hidden)):
        summary.runs.append(
            await train_baseline(
                name, hidden=hidden, epochs=config.epochs, lr=config.lr, limit=config.limit, keys=keys
            )
        )
    if summary.runs[0].results:
        plot = config.plot_path or config.workdir / "esper-demo.png"
        summary.plot_path = plot_runs(summary.runs, plot, f"Esper-Lite demo {summary.run_id}")


def _print_summary(summary: DemoSummary, config: DemoConfig, out: TextIO) -> None:
    if summary.runs:
        print_comparison(summary.runs, out)
        print_runs(summary.runs, out)
    print("", file=out)
    print(f"run {summary.run_id} finished in {summary.elapsed_s:.1f}s", file=out)
    if summary.runs and summary.runs[0].final is not None:
        live = ", ".join(f"{s.seed_id}:{s.blueprint_id}" for s in summary.runs[0].final.seeds) or "none"
        print(f"seeds at the end: {live}", file=out)
    print(f"grafts: {'; '.join(summary.grafts) or 'none'}", file=out)
    if summary.no_graft_reason:
        print(f"no seed was grafted: {summary.no_graft_reason}", file=out)
    if summary.plot_path is not None:
        print(f"plot: {summary.plot_path}", file=out)
    if config.with_nissa:
        missing = [s for s in EXPECTED_SOURCES if s not in summary.nissa_sources]
        seen = ", ".join(sorted(summary.nissa_sources)) or "none"
        print(
            f"Nissa saw series from: {seen}" + (f" (missing: {', '.join(missing)})" if missing else ""),
            file=out,
        )
