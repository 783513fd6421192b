from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaSeedManager, SeedSlot, add_seed_slots
from esper.leyline import leyline_pb2 as L

from .conftest import DIM, Runtime, events_named, make_host


def _host_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_add_seed_slots_wraps_in_place_and_rejects_typos() -> None:
    model = nn.Sequential(nn.Linear(4, DIM), nn.Sequential(nn.Linear(DIM, DIM)))
    slots = add_seed_slots(model, {"0": DIM, "1.0": DIM})
    assert isinstance(model[0], SeedSlot)
    assert isinstance(model[1][0], SeedSlot)
    assert slots["1.0"].slot_name == "1.0"
    with pytest.raises(KeyError):
        add_seed_slots(model, {"7": DIM})
    with pytest.raises(ValueError, match="already"):
        add_seed_slots(model, {"0": DIM})
    x = torch.randn(3, 4)
    assert model(x).shape == (3, DIM)


def test_empty_slot_is_exactly_the_host() -> None:
    torch.manual_seed(1)
    inner = nn.Linear(DIM, DIM)
    slot = SeedSlot(inner, DIM)
    x = torch.randn(5, DIM)
    assert torch.equal(slot(x), inner(x))


def test_blend_trains_kernel_and_sends_no_host_gradient_through_seed() -> None:
    x = torch.randn(16, 4)
    target = torch.randn(16, 2)
    model = make_host()
    slot = model[2]
    assert isinstance(slot, SeedSlot)
    torch.manual_seed(5)
    kernel = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))
    slot.attach(kernel)
    slot.alpha = 0.3

    loss = nn.functional.mse_loss(model(x), target)
    loss.backward()
    seeded = _host_grads(model)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in kernel.parameters())
    assert not any(id(p) in {id(q) for q in model.parameters()} for p in kernel.parameters())

    # Reference: same forward, but the seed term is a constant. Host grads must match exactly,
    # so nothing reached the host through the seed branch.
    model.zero_grad()
    h = model[1](model[0](x))
    y_host = slot.host(h)
    seed_const = kernel(y_host.detach()).detach()
    reference = nn.functional.mse_loss(model[3]((1 - 0.3) * y_host + 0.3 * seed_const), target)
    reference.backward()
    expected = _host_grads(model)
    assert seeded.keys() == expected.keys()
    for name in seeded:
        torch.testing.assert_close(seeded[name], expected[name], rtol=0, atol=1e-7)
    # and the host still learns through its own path
    assert seeded["2.host.weight"].abs().sum() > 0


def test_output_moves_from_host_to_seed_as_alpha_rises() -> None:
    torch.manual_seed(2)
    slot = SeedSlot(nn.Linear(DIM, DIM), DIM)
    slot.attach(nn.Linear(DIM, DIM))
    x = torch.randn(4, DIM)
    host_out = slot.host(x)
    distances = []
    for alpha in (0.0, 0.25, 0.5, 1.0):
        slot.alpha = alpha
        distances.append(float((slot(x) - host_out).detach().norm()))
    assert distances[0] == 0.0
    assert distances == sorted(distances)
    assert distances[-1] > distances[1] > 0


def test_kernel_is_not_a_host_submodule() -> None:
    model = make_host()
    slot = model[2]
    assert isinstance(slot, SeedSlot)
    n_host = len(list(model.parameters()))
    slot.attach(nn.Linear(DIM, DIM))
    assert len(list(model.parameters())) == n_host
    assert len(slot.seed_parameters()) == 2


async def test_alpha_rises_step_by_step_during_blending_and_changes_output(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    manager = make_manager()
    model = make_host()
    manager.register_host_model(model)
    await manager.germinate("2", "BP100")
    x = torch.randn(6, 4)
    seed = manager.get_seed("2")
    assert seed is not None
    alphas: list[float] = []
    outputs: list[torch.Tensor] = []
    stages = []
    for _ in range(manager.training_steps + manager.alpha_schedule.total_steps):
        model(x).sum().backward()
        manager.step()
        alphas.append(seed.alpha)
        stages.append(seed.stage)
        with torch.no_grad():
            outputs.append(model(x))
    blending = [a for a, s in zip(alphas, stages, strict=True) if s == L.SEED_STAGE_BLENDING]
    assert len(blending) >= 10  # BLENDING is observable over many steps
    assert blending == sorted(blending)
    assert blending[0] < 0.05
    assert blending[-1] > 0.9
    assert stages[-1] == L.SEED_STAGE_SHADOWING
    assert alphas[-1] == 1.0
    assert not torch.allclose(outputs[0], outputs[-1])
    assert seed.gradient_norm > 0
    for _ in range(manager.shadowing_steps):
        manager.step()
    assert seed.stage == L.SEED_STAGE_PROBATIONARY


async def test_shared_host_parameter_is_a_violation_acted_on_and_reset(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    model = make_host()
    thief = nn.Linear(DIM, DIM)
    thief.weight = model[2].host.weight  # tied to a host weight

    class TiedRuntime(Runtime):
        def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
            return thief, 1.0

    manager2 = make_manager(runtime=TiedRuntime())
    manager2.register_host_model(model)
    await manager2.germinate("2", "BPTIED")
    seed_ctx = manager2.get_seed("2")
    assert seed_ctx is not None
    assert seed_ctx.stage == L.SEED_STAGE_EMBARGOED
    assert seed_ctx.isolation_violations == 1
    [violation] = events_named(manager2, "isolation_violation")
    assert violation["reason"] == "shared_parameters"
    assert model[2].kernel is None  # nothing grafted into the host
    packet = manager2.build_telemetry()
    metrics = {m.name: m.value for m in packet.metrics}
    assert metrics["kasmina.isolation.violations"] == 1
    assert packet.system_health.status == L.HEALTH_STATUS_UNHEALTHY
    assert manager2.retire("2")  # still embargoed: cleaned, counter reset, stays embargoed
    assert seed_ctx.isolation_violations == 0
    assert seed_ctx.stage == L.SEED_STAGE_EMBARGOED
    packet = manager2.build_telemetry()
    assert {m.name: m.value for m in packet.metrics}["kasmina.isolation.violations"] == 0
    assert packet.system_health.status == L.HEALTH_STATUS_HEALTHY


async def test_kernel_capturing_host_weight_is_caught_on_the_real_graph(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    model = make_host()
    host_weight = model[0].weight

    class Sneaky(nn.Module):
        """No shared parameter, but reads a host weight through a closure."""

        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(DIM, DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + host_weight.sum() * 0.01

    class SneakyRuntime(Runtime):
        def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
            return Sneaky(), 1.0

    manager = make_manager(runtime=SneakyRuntime())
    manager.register_host_model(model)
    await manager.germinate("2", "BPS")
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_TRAINING
    model(torch.randn(3, 4)).sum().backward()
    manager.step()
    assert seed.stage == L.SEED_STAGE_EMBARGOED
    [violation] = events_named(manager, "isolation_violation")
    assert violation["reason"] == "host_gradient_through_seed"


async def test_seeds_sharing_a_blueprint_get_distinct_kernels(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    model = nn.Sequential(nn.Linear(4, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM))
    add_seed_slots(model, {"1": DIM, "2": DIM})
    manager = make_manager()
    manager.register_host_model(model)
    await manager.germinate("1", "BP100")
    await manager.germinate("2", "BP100")  # served from the kernel cache
    a, b = manager.get_seed("1"), manager.get_seed("2")
    assert a is not None
    assert b is not None
    assert a.kernel is not None
    assert b.kernel is not None
    assert b.kernel_source == "cache"
    assert a.kernel is not b.kernel
    pa, pb = list(a.kernel.parameters()), list(b.kernel.parameters())
    assert not {id(p) for p in pa} & {id(p) for p in pb}
    before = pb[0].detach().clone()
    with torch.no_grad():
        pa[0].add_(1.0)
    assert torch.equal(pb[0], before)
    assert a.stage == b.stage == L.SEED_STAGE_TRAINING
    assert manager.verify_isolation("1").isolated
    assert manager.verify_isolation("2").isolated
