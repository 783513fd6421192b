"""Typed Urza errors; each carries the ``reason`` string used in KernelArtifactError."""

from __future__ import annotations


class UrzaError(Exception):
    """Base class; ``reason`` is a stable machine-readable string."""

    reason = "urza_error"

    def __init__(self, message: str, *, blueprint_id: str | None = None) -> None:
        super().__init__(message)
        self.blueprint_id = blueprint_id
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class MissingArtifact(UrzaError, KeyError):
    """No catalogue row for the blueprint (also a ``KeyError``)."""

    reason = "missing_artifact"


class ArtifactNotFound(UrzaError):
    """The row exists but its artifact file is gone."""

    reason = "artifact_not_found"


class ChecksumMismatch(UrzaError):
    """The file's SHA-256 differs from the recorded / expected checksum; nothing was loaded."""

    reason = "checksum_mismatch"


class GuardMismatch(UrzaError):
    """The artifact's guard digest differs from the expected one."""

    reason = "guard_mismatch"


class CorruptArtifact(UrzaError):
    """Manifest or tensors unreadable, not an Esper artifact, or shapes/dtypes do not fit the family."""

    reason = "corrupt_artifact"


class InvalidArtifactRef(UrzaError):
    """An artifact reference that is absolute, escapes the artifact dir or is malformed."""

    reason = "invalid_artifact_ref"
