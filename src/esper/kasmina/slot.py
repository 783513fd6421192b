"""Seed slots: the points of a host model where a kernel can be grafted.

A :class:`SeedSlot` wraps one host sub-module ``h`` (a residual graft)::

    y_host = h(x)                                     # host path, fully trainable
    s      = kernel(y_host.detach())                  # seed path, sees a detached copy
    y      = y_host                                   # no kernel / paused / alpha == 0
    y      = (1 - alpha) * y_host + alpha * s         # blending and after

Why this shape:

* (a) the host keeps learning through its own path: ``y_host`` is not
  detached on the host term, so ``h`` and every layer before it get
  ``(1 - alpha) * dL/dy``;
* (b) nothing flows into host parameters through the seed branch: the kernel's
  only input is ``y_host.detach()``, a leaf with no history, so the seed term's
  gradient stops at the kernel. (A kernel that *shares* a host parameter, or
  captures one in a closure, would break this; the manager checks both, see
  :mod:`esper.kasmina.isolation`);
* (c) the kernel gets ``alpha * dL/dy`` and therefore learns while blending.

Kernels take and return ``[batch, d]``; a host output ``[..., d]`` is
flattened to ``[N, d]`` for the kernel and reshaped back. ``alpha`` is a plain
float set by the manager, never a tensor, so it is not trained.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from esper.kasmina.isolation import graph_leaf_ids


class SeedSlot(nn.Module):
    """A host sub-module plus an optional grafted kernel (see the module docstring)."""

    def __init__(self, host: nn.Module, dim: int, name: str = "") -> None:
        super().__init__()
        if dim <= 0:
            raise ValueError("slot dimension must be positive")
        self.host = host
        self.dim = dim
        self.slot_name = name
        self.alpha = 0.0
        self.paused = False
        # Collect the leaves reachable from the seed output on each training
        # forward, so the manager can verify isolation on the real graph.
        self.collect_isolation = True
        self.last_seed_leaf_ids: frozenset[int] = frozenset()
        self.last_seed_output_finite = True
        self.forward_count = 0
        # The kernel lives outside ``_modules`` on purpose: host optimizers built
        # from ``model.parameters()`` must never pick up (or step) seed weights.
        self._kernel: nn.Module | None
        object.__setattr__(self, "_kernel", None)

    @property
    def kernel(self) -> nn.Module | None:
        return self._kernel

    def attach(self, kernel: nn.Module) -> None:
        """Graft ``kernel`` (moved to the host's device); alpha restarts at 0."""
        device = _module_device(self.host)
        if device is not None:
            kernel = kernel.to(device)
        kernel.train(self.training)
        object.__setattr__(self, "_kernel", kernel)
        self.alpha = 0.0
        self.paused = False
        self.last_seed_leaf_ids = frozenset()
        self.last_seed_output_finite = True

    def detach_kernel(self) -> nn.Module | None:
        kernel = self._kernel
        object.__setattr__(self, "_kernel", None)
        self.alpha = 0.0
        self.last_seed_leaf_ids = frozenset()
        return kernel

    def seed_parameters(self) -> list[nn.Parameter]:
        """The kernel's parameters, for the seed optimizer."""
        return [] if self._kernel is None else list(self._kernel.parameters())

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        y_host: torch.Tensor = self.host(*args, **kwargs)
        kernel = self._kernel
        if kernel is None or self.paused:
            return y_host
        if not isinstance(y_host, torch.Tensor) or y_host.shape[-1] != self.dim:
            raise TypeError(f"seed slot {self.slot_name!r} expects a tensor [..., {self.dim}] from its host")
        self.forward_count += 1
        flat = y_host.detach().reshape(-1, self.dim)
        seed_out = kernel(flat)
        if not isinstance(seed_out, torch.Tensor) or tuple(seed_out.shape) != tuple(flat.shape):
            raise TypeError(f"kernel in slot {self.slot_name!r} must map [N, {self.dim}] to [N, {self.dim}]")
        with torch.no_grad():
            self.last_seed_output_finite = bool(torch.isfinite(seed_out).all())
        if self.collect_isolation and seed_out.grad_fn is not None:
            self.last_seed_leaf_ids = graph_leaf_ids(seed_out)
        alpha = self.alpha
        if alpha <= 0.0:
            return y_host
        return (1.0 - alpha) * y_host + alpha * seed_out.reshape(y_host.shape)

    def train(self, mode: bool = True) -> SeedSlot:
        super().train(mode)
        if self._kernel is not None:
            self._kernel.train(mode)
        return self

    def extra_repr(self) -> str:
        attached = self._kernel is not None
        return f"name={self.slot_name!r}, dim={self.dim}, alpha={self.alpha:.4f}, kernel={attached}"


def _module_device(module: nn.Module) -> torch.device | None:
    for param in module.parameters():
        return param.device
    for buffer in module.buffers():
        return buffer.device
    return None


def add_seed_slots(model: nn.Module, slots: Mapping[str, int]) -> dict[str, SeedSlot]:
    """Wrap named sub-modules of ``model`` in :class:`SeedSlot`\\ s, in place.

    ``slots`` maps a dotted sub-module name (as in ``model.named_modules()``)
    to the width ``d`` of its output's last dimension. The slot's name is that
    dotted name, and it is also the default seed id the manager grafts into::

        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        slots = add_seed_slots(model, {"0": 16})   # model[0] is now SeedSlot(Linear)
        manager.register_host_model(model)         # seed "0" grafts into that slot

    Raises KeyError for a name that is not a sub-module and ValueError when it
    is already a slot, so a typo never silently leaves a layer un-wrapped.
    """
    modules = dict(model.named_modules())
    created: dict[str, SeedSlot] = {}
    for name, dim in slots.items():
        if not name or name not in modules:
            raise KeyError(f"no sub-module named {name!r}")
        target = modules[name]
        if isinstance(target, SeedSlot):
            raise ValueError(f"sub-module {name!r} is already a seed slot")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        slot = SeedSlot(target, dim, name=name)
        setattr(parent, attr, slot)
        created[name] = slot
    return created
