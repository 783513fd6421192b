"""Ids chosen by whoever wrote to the bus reach Kasmina's log lines short, escaped and on one line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from esper.core.logs import configure_logging
from esper.core.worker import running
from esper.kasmina import KasminaPrefetchCoordinator, KasminaSeedManager
from esper.kasmina.intake import KasminaCommandIntake
from esper.kasmina.seed_manager import CommandResult
from esper.kasmina.warmer import KernelWarmer
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.urza import UrzaLibrary, UrzaRuntime

from .conftest import Clock, command, make_host

SECRET = b"kasmina-wire-ids-secret-0123456789abcdef"
#: A newline and a forged JSON line, then half a megabyte.
HOSTILE = 'evil\n{"event": "forged"}' + "x" * 500_000


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[OonaClient]:
    bus = OonaClient(redis_url, StreamConfig(instance="kasmina-1", block_ms=200), KeyRing(SECRET))
    try:
        yield bus
    finally:
        await bus.aclose()


def logged(capsys: pytest.CaptureFixture[str], event: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert not any(line["event"] == "forged" for line in lines)
    return next(line for line in lines if line["event"] == event)


def assert_bounded(value: str) -> None:
    assert value.startswith("evil\\x0a{")
    assert value.endswith(f"...[{len(HOSTILE)} chars]")
    assert len(value) < 200


async def test_a_hostile_command_id_is_logged_short(
    client: OonaClient,
    make_manager: Callable[..., KasminaSeedManager],
    clock: Clock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    manager = make_manager()
    manager.register_host_model(make_host())
    results: asyncio.Queue[CommandResult] = asyncio.Queue()
    intake = KasminaCommandIntake(client, manager, on_result=lambda _cmd, result: results.put_nowait(result))
    async with running(intake.run, "intake"):
        unsigned = command(None, clock, command_id=HOSTILE)
        assert (await client.publish_command(unsigned)).ok
        result = await asyncio.wait_for(results.get(), 30)
    assert result.status == "rejected"
    assert_bounded(logged(capsys, "kasmina.command_rejected")["command_id"])


async def test_a_hostile_blueprint_id_is_logged_short_by_the_warmer(
    client: OonaClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("INFO", "json")
    library = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'c.db'}", registry=CollectorRegistry())
    try:
        assert not await KernelWarmer(client, library).warm_kernel(HOSTILE, trigger="catalog_update")
    finally:
        library.close()
    assert_bounded(logged(capsys, "kasmina.warm_failed")["blueprint_id"])


async def test_a_rejected_kernel_reply_logs_the_ids_short(
    client: OonaClient,
    make_manager: Callable[..., KasminaSeedManager],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", "json")
    library = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'c.db'}", registry=CollectorRegistry())
    manager = make_manager()
    manager.register_host_model(make_host())
    settled = asyncio.Event()
    coordinator = KasminaPrefetchCoordinator(
        client, manager, UrzaRuntime(library), training_run_id="run-1", on_kernel=lambda _s: settled.set()
    )
    try:
        async with running(coordinator.run, "prefetch"):
            assert await manager.germinate("2", HOSTILE) == ""
            [request_id] = coordinator.outstanding
            # A reply for that request naming another blueprint: refused as a mismatch.
            ready = leyline_pb2.KernelArtifactReady(request_id=request_id, blueprint_id="BP001")
            assert (await client.publish_kernel_artifact_ready(ready)).ok
            await asyncio.wait_for(settled.wait(), 30)
    finally:
        library.close()
    line = logged(capsys, "kasmina.prefetch_artifact_rejected")
    assert line["reason"] == "blueprint_mismatch"
    assert_bounded(line["blueprint_id"])
    assert line["request_id"] == request_id
