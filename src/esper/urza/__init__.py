"""Urza: the kernel library (SQL catalogue, verified code-free artifacts, kernel runtime).

Importing the package does not import torch: the catalogue, verification
(:meth:`UrzaLibrary.verify_artifact` and its async twin), maintenance and the
artifact format are plain Python, which is all the control plane needs.
The names that build or load modules - :data:`FAMILIES`,
:func:`build_family`, :class:`UrzaRuntime`, :func:`load_bytes`,
:func:`serialize` - are loaded from their torch-backed modules on first
use, as are ``UrzaLibrary.load`` / ``save`` when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper.core.lazy import lazy_exports
from esper.urza.artifact import (
    FORMAT,
    Manifest,
    artifact_ref,
    compute_guard_digest,
    parse_manifest,
    ref_to_relative,
    write_atomic,
)
from esper.urza.catalog import normalize_database_url
from esper.urza.errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    CorruptArtifact,
    GuardMismatch,
    InvalidArtifactRef,
    MissingArtifact,
    UrzaError,
)
from esper.urza.library import UrzaLibrary
from esper.urza.records import ArtifactInfo, MaintenanceReport, UrzaRecord, percentile

if TYPE_CHECKING:
    from esper.urza.families import FAMILIES, build_family
    from esper.urza.modules import load_bytes, serialize
    from esper.urza.runtime import UrzaRuntime

#: Public names that need torch, and the module each lives in.
_TORCH_BACKED = {
    "FAMILIES": "esper.urza.families",
    "build_family": "esper.urza.families",
    "load_bytes": "esper.urza.modules",
    "serialize": "esper.urza.modules",
    "UrzaRuntime": "esper.urza.runtime",
}


__all__ = [
    "FAMILIES",
    "FORMAT",
    "ArtifactInfo",
    "ArtifactNotFound",
    "ChecksumMismatch",
    "CorruptArtifact",
    "GuardMismatch",
    "InvalidArtifactRef",
    "MaintenanceReport",
    "Manifest",
    "MissingArtifact",
    "UrzaError",
    "UrzaLibrary",
    "UrzaRecord",
    "UrzaRuntime",
    "artifact_ref",
    "build_family",
    "compute_guard_digest",
    "load_bytes",
    "normalize_database_url",
    "parse_manifest",
    "percentile",
    "ref_to_relative",
    "serialize",
    "write_atomic",
]

__getattr__, __dir__ = lazy_exports(__name__, _TORCH_BACKED, __all__)
