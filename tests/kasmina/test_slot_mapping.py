"""Seeds named only by number take the first free slot of the host."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from esper.kasmina import KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2

from .conftest import DIM, Clock, command


def _two_slot_host() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, 2))
    add_seed_slots(model, {"1": DIM, "2": DIM})
    return model


async def test_numbered_seeds_fill_free_slots_in_order(
    make_manager: Callable[..., KasminaSeedManager], keys: object, clock: Clock
) -> None:
    manager = make_manager()
    manager.register_host_model(_two_slot_host())
    first = await manager.handle_command(command(keys, clock, seed_id="seed-1"))  # type: ignore[arg-type]
    second = await manager.handle_command(command(keys, clock, seed_id="seed-2"))  # type: ignore[arg-type]
    assert (first.status, second.status) == ("applied", "applied")
    assert manager.slot_for("seed-1") is not manager.slot_for("seed-2")
    assert manager.slot_for("seed-1") is not None
    assert manager.slot_for("seed-1").slot_name == "1"  # type: ignore[union-attr]
    assert manager.slot_for("seed-2").slot_name == "2"  # type: ignore[union-attr]
    # No slot left: the third seed is refused with a reason and nothing changes.
    third = await manager.handle_command(command(keys, clock, seed_id="seed-3"))  # type: ignore[arg-type]
    assert third.status == "rejected"
    assert manager.get_seed("seed-3") is None
    stages = {s.seed_id: s.stage for s in manager.export_seed_states()}
    assert leyline_pb2.SEED_STAGE_DORMANT not in stages.values()
    assert set(stages) == {"seed-1", "seed-2"}


async def test_a_seed_named_after_a_slot_keeps_that_slot(
    make_manager: Callable[..., KasminaSeedManager], keys: object, clock: Clock
) -> None:
    manager = make_manager()
    manager.register_host_model(_two_slot_host())
    result = await manager.handle_command(command(keys, clock, seed_id="2"))  # type: ignore[arg-type]
    assert result.status == "applied"
    assert manager.slot_for("2").slot_name == "2"  # type: ignore[union-attr]


async def test_free_slot_count_follows_grafts(
    make_manager: Callable[..., KasminaSeedManager], keys: object, clock: Clock
) -> None:
    manager = make_manager()
    assert manager.free_slot_count() == 0  # no host registered
    manager.register_host_model(_two_slot_host())
    assert manager.free_slot_count() == 2
    await manager.handle_command(command(keys, clock, seed_id="seed-1"))  # type: ignore[arg-type]
    assert manager.free_slot_count() == 1
