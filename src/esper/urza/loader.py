"""From artifact file to verified file or freshly built module - hashing only when needed.

Every check hashes the file and compares it with the catalogued checksum
before any parse, then verifies the contents without torch
(:func:`esper.urza.artifact.verify_contents`: manifest, blueprint id, guard
digest, header layout, data hash). :meth:`ArtifactLoader.verify_file` stops
there - that is all the control plane does. :meth:`ArtifactLoader.module`
goes on to build the module from its family (:mod:`esper.urza.modules`,
imported only then, so verifying never imports torch).

Two memos (:mod:`esper.urza.caches`) make repeat work cheap without
weakening that: decoded tensors are reused only under the same
``(blueprint_id, checksum)``, and a file is skipped only while its stat is
unchanged since it was verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from esper.urza import artifact as fmt
from esper.urza.caches import KernelCache, VerifiedFiles, stat_key
from esper.urza.errors import ArtifactNotFound, ChecksumMismatch, GuardMismatch
from esper.urza.metrics import LibraryMetrics

if TYPE_CHECKING:
    from torch import nn


def _check_guard(manifest: fmt.Manifest, guard: str | None, bid: str, source: str) -> None:
    if guard and manifest.guard_digest != guard:
        raise GuardMismatch(f"{source}: guard digest differs from the expected one", blueprint_id=bid)


def _open_artifact(path: Path, source: str, bid: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise ArtifactNotFound(f"{source} is missing", blueprint_id=bid) from None


class ArtifactLoader:
    """Verifies files and builds kernels from them, sharing the library's caches and counters.

    ``source`` in every call is how the artifact is named in error messages
    (the catalogued relative path or the reference a caller sent).
    """

    def __init__(self, metrics: LibraryMetrics, cache: KernelCache, verified: VerifiedFiles) -> None:
        self._metrics = metrics
        self._cache = cache
        self._verified = verified

    def hash(self, blob: bytes) -> str:
        """SHA-256 of ``blob``, counted (tests and dashboards watch how often files are re-hashed)."""
        self._metrics.hashed()
        return fmt.sha256_hex(blob)

    def verify_file(self, path: Path, checksum: str, guard: str | None, bid: str, source: str) -> None:
        """Check ``path`` (without torch) unless it is unchanged since it was last verified."""
        with _open_artifact(path, source, bid) as fh:
            key = stat_key(os.fstat(fh.fileno()))
            if self._verified.is_verified(str(path), key, checksum):
                return
            blob = fh.read()
        self._verify(blob, checksum, guard, bid, source)
        self._verified.remember(str(path), key, checksum)

    def module(self, bid: str, checksum: str, guard: str | None, path: Path, source: str) -> nn.Module:
        """A new module for ``(bid, checksum)``: from the tensor cache, else from the verified file."""
        from esper.urza import modules

        entry = self._cache.get((bid, checksum))
        if entry is not None:
            _check_guard(entry.manifest, guard, bid, source)
            self._metrics.lookup(hit=True)
            return modules.instantiate(entry.manifest, entry.tensors, source=source)
        self._metrics.lookup(hit=False)
        with _open_artifact(path, source, bid) as fh:
            key = stat_key(os.fstat(fh.fileno()))
            blob = fh.read()
        manifest = self._verify(blob, checksum, guard, bid, source)
        tensors = modules.decode_tensors(blob, source=source)
        module = modules.instantiate(manifest, tensors, source=source)  # names/shapes/dtypes fit the family
        self._cache.put((bid, checksum), manifest, tensors)  # the module holds its own copies
        self._verified.remember(str(path), key, checksum)
        return module

    def _verify(self, blob: bytes, checksum: str, guard: str | None, bid: str, source: str) -> fmt.Manifest:
        actual = self.hash(blob)
        if actual != checksum:
            raise ChecksumMismatch(
                f"{source}: sha256 {actual[:16]}… != recorded {checksum[:16]}…", blueprint_id=bid
            )
        return fmt.verify_contents(blob, expected_guard=guard, blueprint_id=bid, source=source)
