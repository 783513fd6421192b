"""Seed slots in any model: mistakes are errors naming the layer, before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _platform_support import SECRET
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import esper.grow
from esper.core.settings import load_settings
from esper.grow.slots import add_seeds, check_slot_outputs, slot_width
from esper.oona import OonaClient


class Encoder(nn.Module):
    """A model that is not a Sequential: named blocks, a conv stem and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(4 * 8 * 8, 24), nn.Tanh(), nn.Linear(24, 24))
        self.unused = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x).flatten(1)))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)


def test_slots_go_into_named_layers_of_any_module() -> None:
    model = add_seeds(Encoder(), {"body.0": 24, "body.2": 24})
    assert slot_width(model) == 24
    check_slot_outputs(model, batch(), torch.device("cpu"))
    assert model(batch()[0]).shape == (5, 3)


def test_an_unknown_layer_lists_the_real_ones() -> None:
    with pytest.raises(esper.grow.SeedSlotError, match=r"no layer named 'body\.9'.*'body\.0'"):
        add_seeds(Encoder(), {"body.9": 24})


def test_widths_must_agree_with_each_other_and_with_a_linear_layer() -> None:
    with pytest.raises(esper.grow.SeedSlotError, match="same width"):
        add_seeds(Encoder(), {"body.0": 24, "head": 3})
    with pytest.raises(esper.grow.SeedSlotError, match="outputs 24 features, not 32"):
        add_seeds(Encoder(), {"body.0": 32})
    with pytest.raises(esper.grow.SeedSlotError, match="positive int"):
        add_seeds(Encoder(), {"body.0": 0})
    with pytest.raises(esper.grow.SeedSlotError, match="at least one layer"):
        add_seeds(Encoder(), {})


def test_a_layer_that_is_already_a_slot_is_refused() -> None:
    model = add_seeds(Encoder(), {"body.0": 24})
    with pytest.raises(esper.grow.SeedSlotError, match="already a seed slot"):
        add_seeds(model, {"body.0": 24})


def test_a_wrong_width_on_a_layer_of_another_kind_is_caught_on_a_real_batch() -> None:
    # The stem outputs [N, 4, 8, 8]: its last dimension is 8, not its 4 channels.
    model = add_seeds(Encoder(), {"stem": 4})
    with pytest.raises(esper.grow.SeedSlotError, match=r"'stem' was given width 4.*\(5, 4, 8, 8\)"):
        check_slot_outputs(model, batch(), torch.device("cpu"))


def test_a_slot_the_forward_pass_never_reaches_is_refused() -> None:
    model = add_seeds(Encoder(), {"unused": 24})
    with pytest.raises(esper.grow.SeedSlotError, match="'unused' is not used"):
        check_slot_outputs(model, batch(), torch.device("cpu"))


async def test_train_checks_the_model_and_data_before_touching_the_platform(tmp_path: Path) -> None:
    # No platform runs at this address: every check below must fail first.
    settings = load_settings(leyline_secret=SECRET, var_dir=tmp_path, redis_url="redis://127.0.0.1:1/0")
    client = OonaClient.from_settings(settings, instance="grow-checks")
    platform = esper.grow.Platform(settings, "redis://127.0.0.1:1/0", client)
    x, y = batch()
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    try:
        with pytest.raises(esper.grow.SeedSlotError, match="no seed slots"):
            await platform.train(Encoder(), loader, loader, loss=nn.functional.cross_entropy, epochs=2)
        model = platform.add_seeds(Encoder(), {"stem": 4})
        with pytest.raises(esper.grow.SeedSlotError, match="given width 4"):
            await platform.train(model, loader, loader, loss=nn.functional.cross_entropy, epochs=2)
        with pytest.raises(TypeError, match="re-iterable"):
            await platform.train(model, iter(loader), loader, loss=nn.functional.cross_entropy, epochs=2)
        with pytest.raises(ValueError, match="no batches"):
            await platform.train(model, loader, [], loss=nn.functional.cross_entropy, epochs=2)
        with pytest.raises(ValueError, match="at least 1"):
            await platform.train(model, loader, loader, loss=nn.functional.cross_entropy, epochs=0)
    finally:
        await client.aclose()


def test_checking_the_data_leaves_a_shuffled_loaders_batch_order_alone() -> None:
    from esper.grow.slots import check_reiterable

    def loader() -> DataLoader[tuple[torch.Tensor, ...]]:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.arange(32)), batch_size=32, shuffle=True, generator=generator)

    checked = loader()
    check_reiterable("train", checked)
    assert torch.equal(next(iter(checked))[0], next(iter(loader()))[0])
