"""A small host model for digits-sized tabular data, with named seed slot points.

Tolaria sits in the same package layer as Kasmina and does not import it;
the caller passes Kasmina's ``add_seed_slots`` in, which keeps the layering
acyclic and lets any slot implementation plug in::

    from esper.kasmina import add_seed_slots
    model = build_host_model(64, 10, hidden=32, add_slots=add_seed_slots)
    # model.hidden1 is now a SeedSlot; seed id "hidden1" grafts there

Layers (named, in order): ``hidden1`` Linear(features, hidden) -> ``act1``
ReLU -> ``hidden2`` Linear(hidden, hidden) -> ``act2`` ReLU -> ``head``
Linear(hidden, classes). The slot points are the outputs of ``hidden1`` and
``hidden2`` (width ``hidden``); :data:`DEFAULT_SLOTS` picks ``hidden1``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

SlotAdder = Callable[[nn.Module, Mapping[str, int]], Any]
DEFAULT_SLOTS: tuple[str, ...] = ("hidden1",)
SLOT_POINTS: tuple[str, ...] = ("hidden1", "hidden2")


def build_host_model(
    features: int,
    classes: int,
    *,
    hidden: int = 32,
    add_slots: SlotAdder | None = None,
    slots: Sequence[str] = DEFAULT_SLOTS,
    seed: int | None = 0,
) -> nn.Sequential:
    """The MLP above; with ``add_slots`` the layers in ``slots`` become seed slots of width ``hidden``.

    ``seed`` makes the initial weights reproducible (``None`` leaves the global RNG alone).
    """
    if features <= 0 or classes <= 0 or hidden <= 0:
        raise ValueError("features, classes and hidden must be positive")
    unknown = [name for name in slots if name not in SLOT_POINTS]
    if unknown:
        raise ValueError(f"unknown slot points {unknown}; choose from {list(SLOT_POINTS)}")
    generator_state = torch.random.get_rng_state() if seed is not None else None
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = nn.Sequential(
            OrderedDict(
                [
                    ("hidden1", nn.Linear(features, hidden)),
                    ("act1", nn.ReLU()),
                    ("hidden2", nn.Linear(hidden, hidden)),
                    ("act2", nn.ReLU()),
                    ("head", nn.Linear(hidden, classes)),
                ]
            )
        )
    finally:
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
    if add_slots is not None and slots:
        add_slots(model, {name: hidden for name in slots})
    return model
