"""Seed slots in any ``nn.Module``: placed by layer name, checked against what the layer outputs.

Kernels are forged for one width ``d`` (they map ``[N, d]`` to ``[N, d]``),
so every slot of a model has the same width, and each slot's layer must
output ``[..., d]``. Both are checked before any training: the names and
widths when the slots are added, the outputs on one held-out batch when
training starts, so a mistake is an error naming the layer, never a seed
culled half-way through a run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import nn

from esper.grow.errors import SeedSlotError
from esper.kasmina import SeedSlot, add_seed_slots
from esper.tolaria.compute import split_batch, to_device

M = TypeVar("M", bound=nn.Module)


def add_seeds(model: M, slots: Mapping[str, int]) -> M:
    """Wrap the named layers of ``model`` in seed slots of width ``d``, in place; returns ``model``."""
    if not slots:
        raise SeedSlotError('name at least one layer and its output width, e.g. {"encoder.2": 64}')
    widths = set(slots.values())
    if len(widths) > 1:
        raise SeedSlotError(
            "all seed slots of a model need the same width (kernels are forged for one width), "
            f"got {dict(slots)}"
        )
    modules = dict(model.named_modules())
    for name, width in slots.items():
        if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
            raise SeedSlotError(f"seed slot {name!r}: the width must be a positive int, got {width!r}")
        target = modules.get(name) if name else None
        if target is None:
            known = [n for n in modules if n][:12]
            raise SeedSlotError(f"the model has no layer named {name!r}; its layers include {known}")
        if isinstance(target, nn.Linear) and target.out_features != width:
            raise SeedSlotError(
                f"seed slot {name!r}: the layer outputs {target.out_features} features, not {width}"
            )
    try:
        add_seed_slots(model, slots)
    except ValueError as exc:  # already a slot
        raise SeedSlotError(str(exc)) from None
    return model


def seed_slots(model: nn.Module) -> dict[str, SeedSlot]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SeedSlot)}


def slot_width(model: nn.Module) -> int:
    """The one width of the model's seed slots."""
    slots = seed_slots(model)
    if not slots:
        raise SeedSlotError('the model has no seed slots: call platform.add_seeds(model, {"layer": d}) first')
    widths = {slot.dim for slot in slots.values()}
    if len(widths) > 1:
        raise SeedSlotError(f"all seed slots of a model need the same width, got {sorted(widths)}")
    return widths.pop()


def check_reiterable(name: str, data: Iterable[Any]) -> None:
    """Each epoch iterates the data again: an iterator would be empty from the second epoch on.

    Checked by type, without calling ``iter``: starting a shuffled
    ``DataLoader`` draws from its generator and would change the batch order.
    """
    if isinstance(data, Iterator):
        raise TypeError(f"{name} must be re-iterable (a DataLoader, a list...), not a one-shot iterator")


def check_slot_outputs(model: nn.Module, batch: Any, device: torch.device) -> None:
    """Run one batch (eval mode, no grad) and check every slot's layer outputs ``[..., d]``."""
    slots = seed_slots(model)
    outputs: dict[str, Any] = {}

    def recorder(name: str) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            outputs.setdefault(name, output)

        return hook

    handles = [slot.register_forward_hook(recorder(name)) for name, slot in slots.items()]
    was_training = model.training
    model.eval()
    try:
        inputs, _targets = split_batch(batch)
        with torch.no_grad():
            model(to_device(inputs, device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for name, slot in slots.items():
        output = outputs.get(name)
        if output is None:
            raise SeedSlotError(f"seed slot {name!r} is not used by the model's forward pass")
        if not isinstance(output, torch.Tensor) or output.ndim == 0 or output.shape[-1] != slot.dim:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise SeedSlotError(
                f"seed slot {name!r} was given width {slot.dim}, but its layer outputs {shape}; "
                "the width is the size of the output's last dimension"
            )
