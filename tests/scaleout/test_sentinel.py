"""The control plane on Sentinel: it follows a failover, and a demoted primary is reported not ready."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from _support import LIMIT_S, Trainer, eventually, forge, readyz, serving, settings_for
from _topology import SentinelTopology


async def test_a_failover_is_followed_within_30_s_and_no_request_is_lost(
    tmp_path: Path, sentinel_topology: SentinelTopology
) -> None:
    forge(tmp_path)
    settings = settings_for(tmp_path, sentinel_topology.url)
    async with serving(settings) as service, Trainer(settings).listening() as trainer:
        assert [await trainer.ask(f"before-{i}") for i in range(5)] == ["ready"] * 5
        # Requests keep coming while the sentinel moves the primary (a graceful failover: the old
        # primary becomes a read-only replica, its clients get READONLY, then the new one answers).
        failover = asyncio.create_task(asyncio.to_thread(sentinel_topology.failover))
        during = [asyncio.create_task(trainer.ask(f"during-{i}")) for i in range(20)]
        new_port = await failover
        moved_at = time.monotonic()
        outcomes = await asyncio.gather(*during)
        after = await trainer.ask("after")
        answered_at = trainer.answers["after"][1]
    assert new_port == sentinel_topology.replica.port
    assert outcomes == ["ready"] * 20  # every request was answered: none lost
    assert after == "ready"
    assert answered_at - moved_at < 30.0
    assert not [w for w in service.supervisor.snapshot()["workers"] if w["status"] == "failed"]


async def test_a_demoted_primary_is_reported_not_ready(
    tmp_path: Path, sentinel_topology: SentinelTopology
) -> None:
    """Pointed straight at the primary (no Sentinel in the URL), the service reports its demotion."""
    settings = settings_for(tmp_path, sentinel_topology.primary.url)
    async with serving(settings) as service:
        assert await readyz(service) == 200
        await asyncio.to_thread(sentinel_topology.failover)

        async def not_ready() -> bool:
            return await readyz(service) == 503

        await eventually(not_ready, "/readyz 503 on a demoted primary", LIMIT_S)
        health = await service.health()
        assert any("read-only" in p for p in health.problems), health.problems
