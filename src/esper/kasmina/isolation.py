"""Checks that a grafted kernel cannot push gradient into the host.

The slot's blend detaches the seed input, so by construction the seed branch
has no path into host parameters. Construction can still be defeated by the
kernel itself: it may *share* a host parameter (tied weights, a host layer
reused inside the kernel) or *capture* one in a closure. Esper-lite v1 paired
gradients by parameter id and never called its ``verify()``;
here two checks actually run:

* :func:`shared_parameters` (static, at attach and on every verification):
  kernel tensors that are host parameters, or that alias host storage;
* :func:`graph_leaf_ids` (dynamic, on every training forward of the slot):
  the autograd leaves reachable from the seed output. Any host parameter among
  them would receive gradient through the seed branch on the next backward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class IsolationReport:
    """Outcome of one verification; ``reason`` is empty when isolated."""

    seed_id: str
    isolated: bool
    shared_parameters: int = 0
    host_leaves_in_seed_graph: int = 0
    reason: str = ""


def _storage_key(tensor: torch.Tensor) -> tuple[str, int] | None:
    try:
        return (str(tensor.device), tensor.untyped_storage().data_ptr())
    except RuntimeError:  # tensors without storage (meta, some subclasses)
        return None


def shared_parameters(kernel: nn.Module, host_parameters: Iterable[torch.Tensor]) -> int:
    """How many kernel parameters are, or alias the storage of, host parameters."""
    host = list(host_parameters)
    host_ids = {id(p) for p in host}
    host_storage = {key for p in host if (key := _storage_key(p)) is not None and key[1] != 0}
    shared = 0
    for param in kernel.parameters():
        key = _storage_key(param)
        if id(param) in host_ids or (key is not None and key in host_storage):
            shared += 1
    return shared


def graph_leaf_ids(output: torch.Tensor) -> frozenset[int]:
    """Ids of the leaf tensors (parameters) that ``output``'s autograd graph accumulates into."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return frozenset(found)


def host_parameter_ids(host: nn.Module) -> frozenset[int]:
    return frozenset(id(p) for p in host.parameters())
