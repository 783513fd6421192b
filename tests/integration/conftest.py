"""Integration fixtures: forged kernels (once per session), bus clients, Urza libraries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _loop_support import FORGED, SECRET, D

from esper.karn import KarnCatalog
from esper.oona import DeliveryPolicy, OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretForge
from esper.urza import UrzaLibrary


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real kernels for slot width D, forged once per session."""
    root = tmp_path_factory.mktemp("urza")
    library = UrzaLibrary(root)
    try:
        report = TezzeretForge(KarnCatalog(), library).run(D, list(FORGED))
    finally:
        library.close()
    assert sorted(report.compiled) == sorted(FORGED)
    return root


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(SECRET)


@pytest.fixture
async def make_client(redis_url: str, keyring: KeyRing) -> AsyncIterator[Callable[..., OonaClient]]:
    clients: list[OonaClient] = []

    def factory(
        role: str,
        consumer: str | None = None,
        ring: KeyRing | None = None,
        url: str | None = None,
        **overrides: Any,
    ) -> OonaClient:
        config = StreamConfig(
            instance=consumer or f"{role}-1",
            block_ms=200,
            delivery=DeliveryPolicy(retry_backoff_ms=20, max_deliveries=3),
            **overrides,
        )
        client = OonaClient(url or redis_url, config, ring or keyring)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


@pytest.fixture
def libraries(artifact_dir: Path) -> Iterator[Callable[[], UrzaLibrary]]:
    """Separate library instances on the same catalogue (one per process role)."""
    opened: list[UrzaLibrary] = []

    def open_library() -> UrzaLibrary:
        library = UrzaLibrary(artifact_dir, sweep_grace_seconds=None)
        opened.append(library)
        return library

    yield open_library
    for library in opened:
        library.close()
