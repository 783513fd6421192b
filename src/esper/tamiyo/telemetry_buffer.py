"""A bounded outbox for telemetry packets.

Esper-lite v1 appended every packet to an unbounded list and republished all of
it on each flush. This keeps at most ``capacity`` packets,
drops the *oldest* when full (fresh health matters more than history),
counts what it dropped so the loss is visible, and hands packets out exactly
once through :meth:`drain`.
"""

from __future__ import annotations

import threading
from collections import deque

from esper.leyline import leyline_pb2


class TelemetryBuffer:
    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._packets: deque[leyline_pb2.TelemetryPacket] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        #: Packets evicted unpublished since the buffer was created.
        self.dropped = 0

    @property
    def capacity(self) -> int:
        maxlen = self._packets.maxlen
        assert maxlen is not None
        return maxlen

    def __len__(self) -> int:
        with self._lock:
            return len(self._packets)

    def append(self, packet: leyline_pb2.TelemetryPacket) -> None:
        with self._lock:
            if len(self._packets) == self.capacity:
                self.dropped += 1
            self._packets.append(packet)

    def drain(self, max_items: int | None = None) -> list[leyline_pb2.TelemetryPacket]:
        """Remove and return the oldest packets (all of them by default)."""
        with self._lock:
            count = len(self._packets) if max_items is None else min(max_items, len(self._packets))
            return [self._packets.popleft() for _ in range(count)]
