from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina import KasminaSeedManager
from esper.leyline import leyline_pb2 as L

from .conftest import Clock, Runtime, events_named, make_host


class NanKernel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


async def test_non_finite_kernel_fails_g2_and_is_embargoed(
    make_manager: Callable[..., KasminaSeedManager], clock: Clock
) -> None:
    class NanRuntime(Runtime):
        def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
            return NanKernel(), 1.0

    manager = make_manager(runtime=NanRuntime(), embargo_seconds=30.0)
    model = make_host()
    manager.register_host_model(model)
    await manager.germinate("2", "BPNAN")
    for _ in range(manager.training_steps):
        model(torch.randn(2, 4))
        manager.step()
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_EMBARGOED
    [failure] = events_named(manager, "gate_failure")
    assert failure == {"seed_id": "2", "gate": "G2_STABILITY", "reason": "seed output not finite"}
    assert seed.embargo_until == clock.monotonic() + 30.0


async def _culled(manager: KasminaSeedManager) -> None:
    """Cull through a real path: a kernel tied to a host weight."""
    await manager.germinate("2", "BP100")
    seed = manager.get_seed("2")
    host = manager.host_model
    assert seed is not None
    assert seed.kernel is not None
    assert host is not None
    seed.kernel[0].weight = host[2].host.weight  # the kernel starts sharing a host weight
    manager.step()


async def test_embargo_expires_and_seed_can_be_regrown(
    make_manager: Callable[..., KasminaSeedManager], clock: Clock
) -> None:
    manager = make_manager(embargo_seconds=30.0)
    manager.register_host_model(make_host())
    await _culled(manager)
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_EMBARGOED
    assert await manager.germinate("2", "BP100") == "seed_embargoed"
    clock.advance(29)
    manager.step()
    assert seed.stage == L.SEED_STAGE_EMBARGOED
    clock.advance(2)
    manager.update_epoch(1)
    assert seed.stage == L.SEED_STAGE_DORMANT
    assert [e["to"] for e in events_named(manager, "stage_transition")][-2:] == ["RESETTING", "DORMANT"]
    assert await manager.germinate("2", "BP100") == ""
    assert seed.stage == L.SEED_STAGE_TRAINING


async def test_regerminating_a_live_seed_is_rejected(make_manager: Callable[..., KasminaSeedManager]) -> None:
    manager = make_manager()
    manager.register_host_model(make_host())
    assert await manager.germinate("2", "BP100") == ""
    seed = manager.get_seed("2")
    assert seed is not None
    kernel = seed.kernel
    assert await manager.germinate("2", "BP999") == "seed_exists"
    assert seed.blueprint_id == "BP100"
    assert seed.kernel is kernel
    assert manager.rejections["seed_exists"] == 1
    assert await manager.germinate("9", "BP100") == "unknown_slot"


async def test_pause_and_resume(make_manager: Callable[..., KasminaSeedManager]) -> None:
    manager = make_manager()
    model = make_host()
    manager.register_host_model(model)
    await manager.germinate("2", "BP100")
    for _ in range(5):
        manager.step()
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_BLENDING
    assert seed.alpha > 0
    x = torch.randn(3, 4)
    slot = model[2]
    assert manager.pause("2")
    assert torch.equal(model(x), model[3](slot.host(model[1](model[0](x)))))
    alpha, steps = seed.alpha, seed.alpha_steps
    for _ in range(4):
        manager.step()
    assert (seed.alpha, seed.alpha_steps, seed.stage) == (alpha, steps, L.SEED_STAGE_BLENDING)
    kernel = seed.kernel
    assert manager.resume("2")
    assert seed.kernel is kernel
    assert not seed.paused
    manager.step()
    assert seed.alpha_steps == steps + 1
    assert [e for e in events_named(manager, "seed_paused")]
    assert events_named(manager, "seed_resumed")


async def test_retire_reads_blueprint_first_and_evicts_cache(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    manager = make_manager()
    model = make_host()
    manager.register_host_model(model)
    await manager.germinate("2", "BP100")
    assert "BP100" in manager.kernel_cache
    assert manager.retire("2")
    assert manager.get_seed("2") is None
    assert "BP100" not in manager.kernel_cache
    assert model[2].kernel is None
    [retired] = events_named(manager, "seed_retired")
    assert retired["blueprint_id"] == "BP100"
    assert retired["evicted"] == "true"
    assert not manager.retire("2")
    assert await manager.germinate("2", "BP100") == ""  # slot free again


def test_export_seed_states_counts_age_from_germination(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    import asyncio

    manager = make_manager()
    manager.register_host_model(make_host())
    manager.update_epoch(7)
    asyncio.run(manager.germinate("2", "BP100"))
    manager.update_epoch(10)
    [state] = manager.export_seed_states()
    assert state.seed_id == "2"
    assert state.stage == L.SEED_STAGE_TRAINING
    assert state.age_epochs == 3
    assert state.metrics["alpha"] == 0.0
    try:
        manager.update_epoch(-1)
    except ValueError:
        pass
    else:
        raise AssertionError("negative epoch accepted")
