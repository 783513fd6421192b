"""Kasmina's warmer in the control plane: it verifies kernels (no module is built) and reports failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.core.telemetry import PRIORITY_INDICATOR
from esper.karn import KarnCatalog
from esper.kasmina.warmer import KernelWarmer
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretCompiler
from esper.urza import UrzaLibrary

CATALOG = KarnCatalog()


@pytest.fixture
def library(tmp_path: Path) -> UrzaLibrary:
    lib = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'c.db'}", registry=CollectorRegistry())
    compiler = TezzeretCompiler(lib.root, catalog=CATALOG, prewarm_iterations=2)
    for bid in ("BP002", "BP009"):
        result = compiler.compile(bid, None, d=8)
        lib.save(CATALOG.get(bid), result.artifact_path, result.catalog_update)
    return lib


@pytest.fixture
async def warmer(redis_url: str, library: UrzaLibrary) -> AsyncIterator[KernelWarmer]:
    config = StreamConfig(instance="kasmina-1")
    client = OonaClient(redis_url, config, KeyRing(b"warmer-test-secret-0123456789abcdef"))
    fresh = UrzaLibrary(library.root, library.database_url)  # as the service opens it: nothing verified yet
    try:
        yield KernelWarmer(client, fresh)
    finally:
        await client.aclose()
        fresh.close()
        library.close()


async def test_warming_verifies_once_and_builds_no_module(warmer: KernelWarmer) -> None:
    shared = warmer.library  # the service gives the prefetch worker the same library
    assert await warmer.warm_kernel("BP009", trigger="catalog_update")
    record = shared.get("BP009")
    assert record is not None
    assert warmer.warm == {"BP009": record.checksum}
    snap = shared.metrics_snapshot()
    assert snap["hash_computations"] == 1
    assert snap["cached_kernels"] == 0  # verified, not loaded: trainers build modules
    # What the prefetch worker does next costs no hashing.
    assert (await shared.averify_artifact("BP009")).checksum == record.checksum
    assert shared.metrics_snapshot()["hash_computations"] == 1
    (packet,) = warmer.drain_telemetry()
    assert [e.description for e in packet.events] == ["kernel_warmed"]
    assert packet.system_health.indicators[PRIORITY_INDICATOR] == "NORMAL"
    assert warmer.metrics_snapshot()["kasmina.warm.warmed"] == 1.0


async def test_broken_or_unknown_kernels_are_reported_before_a_trainer_asks(
    warmer: KernelWarmer, library: UrzaLibrary
) -> None:
    assert await warmer.warm_kernel("BP002", trigger="command")
    record = library.get("BP002")
    assert record is not None
    path = library.root / record.artifact_path
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))

    assert not await warmer.warm_kernel("BP002", trigger="command")
    assert not await warmer.warm_kernel("BP404", trigger="command")
    assert "BP002" not in warmer.warm
    assert warmer.outcomes == {"warmed": 1, "checksum_mismatch": 1, "missing_artifact": 1}
    packets = warmer.drain_telemetry()
    failed = [p for p in packets if p.events[0].description == "kernel_warm_failed"]
    reasons = [dict(p.events[0].attributes)["reason"] for p in failed]
    assert reasons == ["checksum_mismatch", "missing_artifact"]
    assert {p.system_health.indicators[PRIORITY_INDICATOR] for p in failed} == {"HIGH"}
    snap = warmer.metrics_snapshot()
    assert snap["kasmina.warm.kernels"] == 0.0
    assert snap["kasmina.warm.checksum_mismatch"] == 1.0
