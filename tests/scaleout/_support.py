"""A control plane in-process on a given Redis URL, a forged kernel, and a trainer-side client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from esper.core.settings import EsperSettings
from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretCompiler
from esper.urza import UrzaLibrary
from esper.weatherlight.service import WeatherlightService

SECRET = "scale-out-test-secret-0123456789abcdef"
LIMIT_S = 30.0


def settings_for(tmp_path: Path, redis_url: str, name: str = "a", **extra: Any) -> EsperSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "urza_database_url": f"sqlite:///{tmp_path}/catalog.db",
        "urza_artifact_dir": tmp_path / "artifacts",
        "var_dir": tmp_path / f"var-{name}",
        "weatherlight_http_port": 0,
        "weatherlight_telemetry_interval_s": 0.2,
        "leyline_secret": SECRET,
    }
    values.update(extra)
    return EsperSettings(**values)


def forge(tmp_path: Path, blueprint: str = "BP001") -> None:
    """One real kernel in the catalogue the services open."""
    with UrzaLibrary(tmp_path / "artifacts", f"sqlite:///{tmp_path}/catalog.db") as library:
        catalog = KarnCatalog()
        result = TezzeretCompiler(library.root, catalog=catalog, prewarm_iterations=2).compile(
            blueprint, None, d=8
        )
        library.save(catalog.get(blueprint), result.artifact_path, result.catalog_update)


@asynccontextmanager
async def serving(settings: EsperSettings) -> AsyncIterator[WeatherlightService]:
    service = WeatherlightService(settings)
    await service.start()
    try:
        yield service
    finally:
        result = await service.stop()
        assert result.exit_code == 0, result


class Trainer:
    """Asks for kernels and collects the answers (ready or error) by request id."""

    def __init__(self, settings: EsperSettings) -> None:
        self.client = OonaClient.from_settings(settings, instance="trainer")
        self.answers: dict[str, tuple[str, float]] = {}
        self.changed = asyncio.Event()

    async def _on_ready(self, message: OonaMessage) -> None:
        self._answer(message.decode(L.KernelArtifactReady).request_id, "ready")

    async def _on_error(self, message: OonaMessage) -> None:
        error = message.decode(L.KernelArtifactError)
        self._answer(error.request_id, error.reason)

    def _answer(self, request_id: str, outcome: str) -> None:
        self.answers.setdefault(request_id, (outcome, time.monotonic()))
        self.changed.set()

    @asynccontextmanager
    async def listening(self) -> AsyncIterator[Trainer]:
        c = self.client.config
        ready = self.client.broadcast(
            c.kernel_ready_stream,
            self._on_ready,
            types={L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY},
            ignore_types={L.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE},
        )
        errors = self.client.broadcast(
            c.kernel_error_stream, self._on_error, types={L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR}
        )
        try:
            async with running(ready.run, "ready"), running(errors.run, "errors"):
                yield self
        finally:
            await self.client.aclose()

    async def ask(self, request_id: str, blueprint: str = "BP001", *, resend_after_s: float = 5.0) -> str:
        """Publish a request until it is answered (a trainer re-sends one left unanswered); the outcome."""
        async with asyncio.timeout(LIMIT_S):
            while request_id not in self.answers:
                request = L.KernelPrefetchRequest(
                    request_id=request_id, blueprint_id=blueprint, training_run_id="run"
                )
                request.issued_at.GetCurrentTime()
                if not (await self.client.publish_kernel_prefetch_request(request)).ok:
                    await asyncio.sleep(0.1)  # the trainer's own pacing while the bus is refusing
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._answered(request_id), resend_after_s)
        return self.answers[request_id][0]

    async def _answered(self, request_id: str) -> None:
        while request_id not in self.answers:
            self.changed.clear()
            await self.changed.wait()


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, limit_s: float = LIMIT_S) -> None:
    """Poll a real condition (an HTTP probe) that has no event to wait on, with a deadline."""
    deadline = time.monotonic() + limit_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def readyz(service: WeatherlightService) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", service.http.port)
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        await writer.drain()
        head = (await reader.read()).split(b"\r\n", 1)[0]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return int(head.split()[1])


def stream_config(settings: EsperSettings) -> StreamConfig:
    return StreamConfig.from_settings(settings, instance="probe")


__all__ = [
    "SECRET",
    "KeyRing",
    "Trainer",
    "eventually",
    "forge",
    "readyz",
    "serving",
    "settings_for",
    "stream_config",
]
