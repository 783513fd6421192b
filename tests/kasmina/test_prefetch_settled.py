"""The bus coordinator tells its owner when a kernel request is settled, so a trainer waits on that."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from torch import nn

from esper.core.worker import WorkerContext, run_children, running
from esper.karn import KarnCatalog
from esper.kasmina import KasminaPrefetchCoordinator, KasminaSeedManager, add_seed_slots
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretForge
from esper.urza import UrzaLibrary, UrzaRuntime
from esper.urza.prefetch import UrzaPrefetchWorker

SECRET = b"kasmina-settled-secret-0123456789abcdef"
D = 8


async def test_on_kernel_reports_attached_and_failed_requests(redis_url: str, tmp_path: Path) -> None:
    library = UrzaLibrary(tmp_path / "urza")
    await asyncio.to_thread(_forge, library)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, D), nn.Linear(D, D), nn.Linear(D, 2))
    add_seed_slots(model, {"0": D, "1": D})
    manager = KasminaSeedManager(runtime=UrzaRuntime(library), keys=KeyRing(SECRET), training_run_id="run")
    manager.register_host_model(model)
    settled: list[str] = []
    changed = asyncio.Event()

    def on_kernel(seed_id: str) -> None:
        settled.append(seed_id)
        changed.set()

    clients = [
        OonaClient(redis_url, StreamConfig(instance=f"k{i}", block_ms=200), KeyRing(SECRET)) for i in (1, 2)
    ]
    coordinator = KasminaPrefetchCoordinator(
        clients[0], manager, UrzaRuntime(library), training_run_id="run", on_kernel=on_kernel
    )
    worker = UrzaPrefetchWorker(clients[1], library)

    async def both(ctx: WorkerContext) -> None:
        await run_children(ctx, {"urza": worker.run, "kasmina": coordinator.run})

    try:
        async with running(both, "bus"):
            assert await manager.germinate("0", "BP002") == ""
            assert manager.awaiting_kernels() == ["0"]
            await asyncio.wait_for(changed.wait(), 30)
            assert settled == ["0"]
            assert manager.awaiting_kernels() == []
            assert manager.seeds["0"].kernel_source == "bus"

            changed.clear()
            assert await manager.germinate("1", "BP050") == ""  # never forged: Urza answers with an error
            await asyncio.wait_for(changed.wait(), 30)
            assert settled == ["0", "1"]
            assert manager.awaiting_kernels() == []
            assert manager.seeds["1"].used_fallback
    finally:
        for client in clients:
            await client.aclose()
        library.close()


def _forge(library: UrzaLibrary) -> None:
    TezzeretForge(KarnCatalog(), library).run(D, ["BP001", "BP002"])
