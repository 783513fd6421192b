"""Kasmina's telemetry plumbing: per-packet priority and a bounded packet buffer.

Priority is derived from the events *in that packet only* (CRITICAL event ->
CRITICAL; WARNING or ERROR -> HIGH; else NORMAL). Nothing carries over to the
next packet, so one bad moment cannot pin Kasmina to the emergency stream
(esper-lite v1's never-reset violation counter did exactly that). The
buffer is a bounded deque that counts what it had to drop,
instead of esper-lite v1's unbounded list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

from esper.core.telemetry import TelemetryEvent
from esper.leyline import leyline_pb2

_T = TypeVar("_T")


def packet_priority(events: Iterable[TelemetryEvent]) -> leyline_pb2.MessagePriority.ValueType:
    priority = leyline_pb2.MESSAGE_PRIORITY_NORMAL
    for event in events:
        if event.level == leyline_pb2.TELEMETRY_LEVEL_CRITICAL:
            return leyline_pb2.MESSAGE_PRIORITY_CRITICAL
        if event.level in (leyline_pb2.TELEMETRY_LEVEL_WARNING, leyline_pb2.TELEMETRY_LEVEL_ERROR):
            priority = leyline_pb2.MESSAGE_PRIORITY_HIGH
    return priority


def priority_name(priority: leyline_pb2.MessagePriority.ValueType) -> str:
    """``MESSAGE_PRIORITY_HIGH`` -> ``HIGH``."""
    return leyline_pb2.MessagePriority.Name(priority).removeprefix("MESSAGE_PRIORITY_")


def packet_level(events: Iterable[TelemetryEvent]) -> leyline_pb2.TelemetryLevel.ValueType:
    """The most severe event level (INFO when there are none)."""
    return max((e.level for e in events), default=leyline_pb2.TELEMETRY_LEVEL_INFO)


class BoundedBuffer(Generic[_T]):
    """A FIFO that keeps the newest ``capacity`` items and counts the dropped ones."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._items: deque[_T] = deque(maxlen=capacity)
        self.dropped = 0

    def append(self, item: _T) -> None:
        if len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)

    def drain(self) -> list[_T]:
        items = list(self._items)
        self._items.clear()
        return items

    def snapshot(self) -> list[_T]:
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)
