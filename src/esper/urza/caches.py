"""Urza's two in-memory memos: verified files and decoded kernel tensors.

Both exist so the hot paths (prefetch answers, Kasmina attaching kernels)
skip work that cannot have changed, and both are memory only - rows and
files are never expired by them.

* :class:`VerifiedFiles` remembers a file as verified by its
  ``(size, mtime_ns, inode)`` and checksum, so an unchanged artifact is
  never hashed twice; any rewrite changes the stat and forces a re-hash.
* :class:`KernelCache` is an LRU (optionally with a TTL) of decoded tensors
  keyed by ``(blueprint_id, checksum)``; every load still builds a **new**
  module from them, so no two callers share a module. Only processes that
  load kernels fill it; verification alone (the control plane) never does.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esper.urza import artifact as fmt

if TYPE_CHECKING:
    import torch

StatKey = tuple[int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    """What identifies one version of a file: size, mtime_ns and inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class _Verified:
    stat_key: StatKey
    checksum: str


class VerifiedFiles:
    """Thread-safe memo of files already hashed and parsed, keyed by path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Verified] = {}
        self.hits = 0

    def is_verified(self, path: str, key: StatKey, checksum: str) -> bool:
        """True (and counted as a hit) when ``path`` was verified with this stat and checksum."""
        with self._lock:
            known = self._entries.get(path)
            if known is not None and known.stat_key == key and known.checksum == checksum:
                self.hits += 1
                return True
            return False

    def remember(self, path: str, key: StatKey, checksum: str) -> None:
        with self._lock:
            self._entries[path] = _Verified(key, checksum)


@dataclass
class CachedKernel:
    manifest: fmt.Manifest
    tensors: dict[str, torch.Tensor]
    stored_at: float


class KernelCache:
    """Thread-safe LRU of decoded kernels; ``size`` 0 disables it, ``ttl`` bounds an entry's age."""

    def __init__(self, size: int, ttl_seconds: float | None) -> None:
        self._size = max(0, int(size))
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], CachedKernel] = OrderedDict()
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def put(self, key: tuple[str, str], manifest: fmt.Manifest, tensors: dict[str, torch.Tensor]) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._entries[key] = CachedKernel(manifest, tensors, time.monotonic())
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def get(self, key: tuple[str, str]) -> CachedKernel | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._ttl is not None and time.monotonic() - entry.stored_at > self._ttl:
                del self._entries[key]  # memory only: rows and files are never expired
                self.expired += 1
                return None
            self._entries.move_to_end(key)
            return entry

    def drop_blueprint(self, blueprint_id: str) -> None:
        """Forget every cached version of one blueprint (its row was deleted)."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == blueprint_id]:
                del self._entries[key]
