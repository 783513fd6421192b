from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from esper.kasmina import KasminaSeedManager
from esper.leyline import leyline_pb2 as L

from .conftest import Clock, Runtime, events_named, make_host


class RecordingProvider:
    """A bus-like provider: remembers requests; answers only when the test says so."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str]] = []

    async def request(self, seed_id: str, blueprint_id: str, training_run_id: str) -> None:
        self.requests.append((seed_id, blueprint_id, training_run_id))


@pytest.fixture
def bus_manager(
    make_manager: Callable[..., KasminaSeedManager],
) -> tuple[KasminaSeedManager, RecordingProvider]:
    provider = RecordingProvider()
    manager = make_manager(kernel_provider=provider)
    manager.register_host_model(make_host())
    return manager, provider


async def test_seed_waits_in_germinated_until_the_kernel_arrives(
    bus_manager: tuple[KasminaSeedManager, RecordingProvider],
) -> None:
    manager, provider = bus_manager
    await manager.germinate("2", "BP200")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_GERMINATED
    assert seed.pending is not None
    assert provider.requests == [("2", "BP200", "run-1")]
    manager.step()
    assert seed.stage == L.SEED_STAGE_GERMINATED
    assert not await manager.attach_kernel("2", "BP999", nn.Linear(8, 8), 1.0)  # wrong blueprint: ignored
    assert await manager.attach_kernel("2", "BP200", nn.Linear(8, 8), 2.5)
    assert seed.stage == L.SEED_STAGE_TRAINING
    assert seed.kernel_source == "bus"
    assert not seed.used_fallback
    assert not await manager.attach_kernel("2", "BP200", nn.Linear(8, 8), 1.0)  # late duplicate
    assert events_named(manager, "kernel_ignored")[-1]["reason"] == "not_pending"
    assert "BP200" in manager.kernel_cache


async def test_provider_failure_falls_back_to_bp001_then_identity(
    make_manager: Callable[..., KasminaSeedManager], runtime: Runtime
) -> None:
    runtime.fail = {"BP300"}
    manager = make_manager()
    manager.register_host_model(make_host())
    await manager.germinate("2", "BP300")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.used_fallback
    assert seed.stage == L.SEED_STAGE_TRAINING
    assert runtime.calls == ["BP300", "BP001"]
    assert getattr(seed.kernel, "blueprint_id", None) == "BP001"
    [failed] = events_named(manager, "kernel_failed")
    assert "cannot build BP300" in failed["reason"]
    [fallback] = events_named(manager, "fallback_applied")
    assert fallback["fallback"] == "BP001"
    assert fallback["reason"].startswith("provider_error")

    runtime.fail = {"BP301", "BP001"}
    manager2 = make_manager()
    manager2.register_host_model(make_host())
    await manager2.germinate("2", "BP301")
    seed2 = manager2.get_seed("2")
    assert seed2 is not None
    assert isinstance(seed2.kernel, nn.Identity)
    [fallback2] = events_named(manager2, "fallback_applied")
    assert fallback2["fallback"] == "identity"
    assert "fallback BP001 failed" in fallback2["reason"]
    assert manager2.build_telemetry().system_health.summary == "fallback"


async def test_latency_over_budget_uses_fallback(
    make_manager: Callable[..., KasminaSeedManager], runtime: Runtime
) -> None:
    runtime.latency_ms = 25.0
    manager = make_manager()
    manager.register_host_model(make_host())
    await manager.germinate("2", "BP400")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.used_fallback
    assert events_named(manager, "latency_budget_exceeded")[0]["latency_ms"] == "25.00"
    assert events_named(manager, "fallback_applied")[0]["reason"] == "latency_budget_exceeded"
    assert manager.breaker.failures == 1
    assert "BP400" not in manager.kernel_cache


async def test_breaker_opens_after_three_failures_and_denies(
    make_manager: Callable[..., KasminaSeedManager], clock: Clock
) -> None:
    provider = RecordingProvider()
    manager = make_manager(kernel_provider=provider, embargo_seconds=0.0, fallback_blueprint_id="")
    for i in range(3):
        await manager.germinate(f"s{i}", "BP500")
        await manager.kernel_failed(f"s{i}", "BP500", "forge down")
    assert manager.breaker.state == L.CIRCUIT_STATE_OPEN
    assert events_named(manager, "breaker_event")[-1]["to"] == "CIRCUIT_STATE_OPEN"
    await manager.germinate("s3", "BP501")
    assert len(provider.requests) == 3  # denied: never asked
    assert events_named(manager, "breaker_denied")[0]["seed_id"] == "s3"
    assert events_named(manager, "fallback_applied")[-1]["reason"].startswith("breaker_open")
    clock.advance(61)
    assert manager.breaker.state == L.CIRCUIT_STATE_HALF_OPEN
    await manager.germinate("s4", "BP502")
    assert len(provider.requests) == 4


async def test_prefetch_timeout_retries_once_then_falls_back(
    bus_manager: tuple[KasminaSeedManager, RecordingProvider], clock: Clock
) -> None:
    manager, provider = bus_manager
    await manager.germinate("2", "BP600")
    clock.advance(4.9)
    assert await manager.expire_pending() == 0
    clock.advance(0.2)
    assert await manager.expire_pending() == 1
    assert len(provider.requests) == 2  # retried
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_GERMINATED
    clock.advance(5.1)
    assert await manager.expire_pending() == 1
    assert len(provider.requests) == 2
    assert seed.used_fallback
    assert seed.stage == L.SEED_STAGE_TRAINING
    assert events_named(manager, "fallback_applied")[-1]["reason"] == "prefetch_timeout"
    assert len(events_named(manager, "prefetch_timeout")) == 2


def test_prefetch_timeout_without_event_loop_still_ends(
    make_manager: Callable[..., KasminaSeedManager], clock: Clock
) -> None:
    import asyncio

    provider = RecordingProvider()
    manager = make_manager(kernel_provider=provider)
    manager.register_host_model(make_host())
    asyncio.run(manager.germinate("2", "BP601"))
    seed = manager.get_seed("2")
    assert seed is not None
    clock.advance(6)
    manager.step()  # no loop: retry marked due, deadline extended
    assert seed.pending is not None
    assert seed.pending.retry_due
    clock.advance(6)
    manager.step()
    assert seed.pending is None
    assert seed.used_fallback


async def test_provider_that_raises_is_a_failed_request(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    class Broken:
        async def request(self, seed_id: str, blueprint_id: str, training_run_id: str) -> None:
            raise ConnectionError("bus down")

    manager = make_manager(kernel_provider=Broken())
    manager.register_host_model(make_host())
    await manager.germinate("2", "BP700")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.used_fallback
    assert events_named(manager, "kernel_failed")[0]["reason"] == "request_error: ConnectionError"


async def test_bad_interface_kernel_is_culled(make_manager: Callable[..., KasminaSeedManager]) -> None:
    class Wrong(Runtime):
        def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
            return nn.Linear(8, 3), 1.0

    manager = make_manager(runtime=Wrong())
    model = make_host()
    manager.register_host_model(model)
    await manager.germinate("2", "BP800")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_EMBARGOED
    assert model[2].kernel is None
    assert events_named(manager, "gate_failure")[0]["gate"] == "G3_INTERFACE"
