"""UrzaRuntime: the blueprint runtime Kasmina attaches kernels from."""

from __future__ import annotations

import asyncio
import time

from torch import nn

from esper.urza.library import UrzaLibrary


class UrzaRuntime:
    """Verified, ready-to-attach kernels; every call returns a new module instance."""

    def __init__(self, library: UrzaLibrary) -> None:
        self.library = library

    def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
        """Return ``(module, latency_ms)``; latency covers the catalogue lookup, verification and load.

        Raises ``MissingArtifact`` (a ``KeyError``), ``ArtifactNotFound``,
        ``ChecksumMismatch``, ``GuardMismatch`` or ``CorruptArtifact``.
        """
        started = time.perf_counter()
        module = self.library.load(blueprint_id)
        return module, (time.perf_counter() - started) * 1000.0

    def load_kernel(self, blueprint_id: str) -> nn.Module:
        return self.fetch_kernel(blueprint_id)[0]

    async def afetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
        return await asyncio.to_thread(self.fetch_kernel, blueprint_id)

    def load_verified(self, artifact_ref: str, checksum: str, guard_digest: str) -> tuple[nn.Module, float]:
        started = time.perf_counter()
        module = self.library.load_verified(artifact_ref, checksum, guard_digest)
        return module, (time.perf_counter() - started) * 1000.0

    async def aload_verified(
        self, artifact_ref: str, checksum: str, guard_digest: str
    ) -> tuple[nn.Module, float]:
        return await asyncio.to_thread(self.load_verified, artifact_ref, checksum, guard_digest)
