"""Blueprint metadata for risk decisions, behind a Protocol and a TTL cache.

Tamiyo sits beside Kasmina in the layer stack and must not care whether
descriptors come from Urza, Karn or a static table, so it depends only on
:class:`BlueprintMetadataSource`. Lookups happen on every germination
decision, so :class:`CachedBlueprintMetadata` keeps answers for a TTL
(5 minutes, as in esper-lite v1) in a bounded LRU; unknown ids are *not* cached,
so a blueprint registered a moment later is seen on the next decision.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from esper.leyline import leyline_pb2
from esper.urza import UrzaLibrary


@runtime_checkable
class BlueprintMetadataSource(Protocol):
    """Anything that can describe a blueprint by id."""

    def get(self, blueprint_id: str) -> leyline_pb2.BlueprintDescriptor:
        """The descriptor; raises ``KeyError`` when the blueprint is unknown."""
        ...


class StaticBlueprintMetadata:
    """A fixed in-memory table of descriptors (tests, demos, offline tools)."""

    def __init__(
        self,
        descriptors: Iterable[leyline_pb2.BlueprintDescriptor]
        | Mapping[str, leyline_pb2.BlueprintDescriptor],
    ) -> None:
        items = descriptors.values() if isinstance(descriptors, Mapping) else descriptors
        self._descriptors = {d.blueprint_id: d for d in items}

    def get(self, blueprint_id: str) -> leyline_pb2.BlueprintDescriptor:
        descriptor = self._descriptors[blueprint_id]
        copy = leyline_pb2.BlueprintDescriptor()
        copy.CopyFrom(descriptor)
        return copy

    def put(self, descriptor: leyline_pb2.BlueprintDescriptor) -> None:
        self._descriptors[descriptor.blueprint_id] = descriptor


class CachedBlueprintMetadata:
    """A TTL + LRU cache in front of a slower source; itself a source."""

    def __init__(
        self,
        source: BlueprintMetadataSource,
        *,
        ttl_s: float = 300.0,
        capacity: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or capacity < 1:
            raise ValueError("ttl_s and capacity must be positive")
        self._source = source
        self._ttl_s = ttl_s
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, leyline_pb2.BlueprintDescriptor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, blueprint_id: str) -> leyline_pb2.BlueprintDescriptor:
        now = self._clock()
        with self._lock:
            entry = self._entries.get(blueprint_id)
            if entry is not None and now - entry[0] < self._ttl_s:
                self._entries.move_to_end(blueprint_id)
                self.hits += 1
                return entry[1]
            self.misses += 1
        descriptor = self._source.get(blueprint_id)  # KeyError propagates, uncached
        with self._lock:
            self._entries[blueprint_id] = (now, descriptor)
            self._entries.move_to_end(blueprint_id)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return descriptor

    def invalidate(self, blueprint_id: str | None = None) -> None:
        """Forget one entry, or all of them."""
        with self._lock:
            if blueprint_id is None:
                self._entries.clear()
            else:
                self._entries.pop(blueprint_id, None)


class UrzaBlueprintMetadata:
    """Descriptors of the kernels actually in the Urza catalogue.

    Tamiyo should only propose blueprints that can be grafted, so a blueprint
    Urza does not hold is "unknown" here even when Karn defines it.
    """

    def __init__(self, library: UrzaLibrary) -> None:
        self._library = library

    def get(self, blueprint_id: str) -> leyline_pb2.BlueprintDescriptor:
        record = self._library.get(blueprint_id)
        if record is None:
            raise KeyError(blueprint_id)
        return record.descriptor
