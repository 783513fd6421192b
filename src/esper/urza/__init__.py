"""Urza: the kernel library (SQL catalogue, verified code-free artifacts, kernel runtime)."""

from esper.urza.artifact import (
    FORMAT,
    Manifest,
    artifact_ref,
    compute_guard_digest,
    load_bytes,
    parse_manifest,
    ref_to_relative,
    serialize,
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
from esper.urza.families import FAMILIES, build_family
from esper.urza.library import UrzaLibrary
from esper.urza.records import ArtifactInfo, MaintenanceReport, UrzaRecord, percentile
from esper.urza.runtime import UrzaRuntime

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
