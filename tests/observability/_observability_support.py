"""A live control plane and a live Nissa on the test session's Redis, watched through their HTTP endpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from esper.core.settings import EsperSettings
from esper.core.worker import running
from esper.nissa import NissaService
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.weatherlight.service import WeatherlightService

SECRET = "test-secret-for-esper-lite-0123456789"
LIMIT_S = 30.0  # generous: the machine may be shared; every wait ends as soon as its condition holds

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def replica_settings(root: Path, redis_url: str, name: str) -> EsperSettings:
    """One replica's settings: its own var dir and catalogue, the shared bus."""
    base = root / name
    return EsperSettings(
        redis_url=redis_url,
        urza_database_url=f"sqlite:///{base}/catalog.db",
        urza_artifact_dir=base / "artifacts",
        var_dir=base / "var",
        weatherlight_http_port=0,
        weatherlight_telemetry_interval_s=0.2,
        leyline_secret=SECRET,
    )


@asynccontextmanager
async def weatherlight(settings: EsperSettings) -> AsyncIterator[WeatherlightService]:
    service = WeatherlightService(settings)
    await asyncio.wait_for(service.start(), LIMIT_S)
    try:
        yield service
    finally:
        if service.supervisor.result is None:
            await service.stop()


class Watch:
    """Set after every message Nissa records; waits re-check a real condition, never a timer."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def __call__(self, _stream: str, _message_type: int) -> None:
        self._changed.set()

    async def until(self, condition: Callable[[], bool], what: str, limit_s: float = LIMIT_S) -> None:
        try:
            async with asyncio.timeout(limit_s):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"Nissa never showed {what} within {limit_s}s") from None


@dataclass
class LiveNissa:
    service: NissaService
    watch: Watch

    def samples(self) -> Samples:
        return parse_samples(generate_latest(self.service.registry).decode())


@asynccontextmanager
async def nissa(redis_url: str) -> AsyncIterator[LiveNissa]:
    client = OonaClient(redis_url, StreamConfig(instance="nissa-1", block_ms=200), KeyRing(SECRET.encode()))
    service = NissaService(client, http_port=0)
    watch = Watch()
    service.add_listener(watch)
    try:
        async with running(service.run, "nissa"):
            yield LiveNissa(service, watch)
    finally:
        await client.aclose()


def parse_samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def series_of(samples: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every series of ``name`` whose labels include ``labels``."""
    return {
        key: value
        for (sample, key), value in samples.items()
        if sample == name and all((k, v) in key for k, v in labels.items())
    }


def label_values(samples: Samples, name: str, label: str, **labels: str) -> set[str]:
    return {dict(key).get(label, "") for key in series_of(samples, name, **labels)}
