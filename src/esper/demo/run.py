"""The demo run: Weatherlight (+ Nissa) as processes, a digits model growing through the bus.

Steps: start Weatherlight on the embedded default (or ``REDIS_URL``) and wait
for its READY notification → forge the kernels Tamiyo may ask for, each
announced on the bus (Weatherlight's Kasmina warms them) → start Nissa →
train a small MLP on scikit-learn's bundled digits with Tolaria, whose seed
slots Kasmina fills with kernels fetched from Urza over the bus whenever
Tamiyo (inside Weatherlight) commands a graft → print a live table, write a
plot, check Nissa's metrics, stop everything.
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
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from esper.core.redis_server import embedded_url
from esper.core.settings import EsperSettings, load_settings
from esper.demo.processes import ChildService, http_text, start_nissa, start_weatherlight
from esper.demo.report import plot_run, print_epoch, print_header
from esper.kasmina import KasminaCommandIntake, KasminaPrefetchCoordinator, KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo.policy import DEFAULT_BLUEPRINT_CANDIDATES
from esper.tezzeret import run_forge
from esper.tezzeret.cli import ProgressLine
from esper.tolaria import (
    SLOT_POINTS,
    EpochResult,
    TolariaTrainer,
    TrainingConfig,
    build_host_model,
    load_digits_splits,
)
from esper.urza import UrzaLibrary, UrzaRuntime

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
    command_wait_s: float = 1.5


@dataclass
class DemoSummary:
    run_id: str
    results: list[EpochResult] = field(default_factory=list)
    grafts: list[str] = field(default_factory=list)
    plot_path: Path | None = None
    nissa_sources: set[str] = field(default_factory=set)
    elapsed_s: float = 0.0

    @property
    def succeeded(self) -> bool:
        return bool(self.grafts) and bool(self.results)


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


def _client(settings: EsperSettings, role: str) -> OonaClient:
    return OonaClient.from_settings(settings, instance=f"demo-{role}", name=role)


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
    secret = os.environ.get("ESPER_LEYLINE_SECRET", "").strip()
    if not secret:
        secret = secrets.token_hex(32)
        print("no ESPER_LEYLINE_SECRET set: using a one-off secret for this demo run", file=out)
    env = _environment(config, secret)
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
        await _forge(settings, config, out)
        nissa_url = None
        if config.with_nissa:
            nissa, nissa_url = await start_nissa(env, logs / "nissa.log")
            children.append(nissa)
            print(f"Nissa serving Prometheus metrics at {nissa_url}/metrics", file=out, flush=True)
        await _train(settings, config, summary, out)
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


async def _forge(settings: EsperSettings, config: DemoConfig, out: TextIO) -> None:
    ids = sorted({"BP001", *DEFAULT_BLUEPRINT_CANDIDATES})
    print(f"forging {len(ids)} kernels for width {config.hidden}: {', '.join(ids)}", file=out, flush=True)
    bus = _client(settings, "forge")
    try:

        async def announce(update: leyline_pb2.KernelCatalogUpdate) -> None:
            result = await bus.publish_kernel_catalog_update(update)
            if not result.ok:
                raise RuntimeError(f"catalog update not published: {result.reason}")

        report = await run_forge(settings, config.hidden, ids, announce, ProgressLine(out))
    finally:
        await bus.aclose()
    print(
        f"forge: {len(report.compiled)} compiled, {len(report.skipped)} already in Urza", file=out, flush=True
    )


async def _train(settings: EsperSettings, config: DemoConfig, summary: DemoSummary, out: TextIO) -> None:
    data = load_digits_splits(seed=0, limit=config.limit)
    model = build_host_model(
        data.features, data.classes, hidden=config.hidden, add_slots=add_seed_slots, slots=SLOT_POINTS
    )
    library = UrzaLibrary.from_settings(settings)
    runtime = UrzaRuntime(library)
    keys = KeyRing(*settings.signing_secrets())
    manager = KasminaSeedManager(runtime=runtime, keys=keys, training_run_id=summary.run_id)
    slots = manager.register_host_model(model)
    clients = {role: _client(settings, role) for role in ("tolaria", "prefetch", "intake")}
    trainer: TolariaTrainer | None = None

    def on_result(command: leyline_pb2.AdaptationCommand, result: Any) -> None:
        if trainer is not None:
            trainer.notify_command(command, result)

    coordinator = KasminaPrefetchCoordinator(
        clients["prefetch"], manager, runtime, training_run_id=summary.run_id
    )
    intake = KasminaCommandIntake(clients["intake"], manager, on_result=on_result)
    trainer = TolariaTrainer(
        model,
        manager,
        data.train,
        data.validation,
        client=clients["tolaria"],
        training_run_id=summary.run_id,
        config=TrainingConfig(
            max_epochs=config.epochs, command_wait_s=config.command_wait_s, experiment_name="esper-demo"
        ),
        services=[coordinator, intake],
    )
    print(
        f"training run {summary.run_id}: {data.train_size} training / {data.validation_size} held-out "
        f"digits; seed slots: {', '.join(slots)}",
        file=out,
        flush=True,
    )
    print_header(out)

    def on_epoch(result: EpochResult) -> None:
        summary.results.append(result)
        summary.grafts.extend(f"epoch {result.epoch}: {graft}" for graft in result.grafted)
        print_epoch(result, out)

    try:
        await trainer.run(on_epoch=on_epoch)
    finally:
        for client in clients.values():
            await client.aclose()
        library.close()
    if summary.results:
        plot = config.plot_path or config.workdir / "esper-demo.png"
        summary.plot_path = plot_run(summary.results, plot, f"Esper-Lite demo {summary.run_id}")


def _print_summary(summary: DemoSummary, config: DemoConfig, out: TextIO) -> None:
    print("", file=out)
    print(f"run {summary.run_id} finished in {summary.elapsed_s:.1f}s", file=out)
    if summary.results:
        first, last = summary.results[0], summary.results[-1]
        print(
            f"held-out accuracy {first.validation_accuracy or 0.0:.3f} -> "
            f"{last.validation_accuracy or 0.0:.3f}, "
            f"loss {first.validation_loss:.4f} -> {last.validation_loss:.4f}",
            file=out,
        )
        live = ", ".join(f"{s.seed_id}:{s.blueprint_id}" for s in last.seeds) or "none"
        print(f"seeds at the end: {live}", file=out)
    print(f"grafts: {'; '.join(summary.grafts) or 'none'}", file=out)
    if summary.plot_path is not None:
        print(f"plot: {summary.plot_path}", file=out)
    if config.with_nissa:
        missing = [s for s in EXPECTED_SOURCES if s not in summary.nissa_sources]
        seen = ", ".join(sorted(summary.nissa_sources)) or "none"
        print(
            f"Nissa saw series from: {seen}" + (f" (missing: {', '.join(missing)})" if missing else ""),
            file=out,
        )
