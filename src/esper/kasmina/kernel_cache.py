"""An LRU of kernel *prototypes* keyed by blueprint id that never shares an instance.

Esper-lite v1's GPU cache handed the same module object to every seed using a
blueprint: two seeds then trained one set of weights, and any
kernel with parameters collided in the parameter registry. Here the cache
keeps a private prototype and :meth:`KernelCache.get` returns a deep copy, so
every seed owns its weights. The prototype is copied on the way in too, so a
seed that trains its kernel never changes what the next seed receives.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from torch import nn


class KernelCache:
    def __init__(self, capacity: int = 32) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, nn.Module] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, blueprint_id: object) -> bool:
        return blueprint_id in self._entries

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def get(self, blueprint_id: str) -> nn.Module | None:
        """A fresh deep copy of the cached prototype, or None (counted as a miss)."""
        prototype = self._entries.get(blueprint_id)
        if prototype is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(blueprint_id)
        return copy.deepcopy(prototype)

    def put(self, blueprint_id: str, module: nn.Module) -> None:
        """Store a private copy of ``module`` (the caller keeps using its own)."""
        if not self.enabled:
            return
        self._entries[blueprint_id] = copy.deepcopy(module)
        self._entries.move_to_end(blueprint_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1

    def evict(self, blueprint_id: str) -> bool:
        if self._entries.pop(blueprint_id, None) is None:
            return False
        self.evictions += 1
        return True

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count
