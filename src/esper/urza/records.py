"""The values Urza hands out: catalogue records, artifact descriptions, sweep reports.

Kept apart from the storage code so callers (the prefetch worker, Tezzeret,
Kasmina) can depend on the shapes without pulling in SQLAlchemy details.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import json_format

from esper.leyline import leyline_pb2
from esper.urza import artifact as fmt


def percentile(samples: Iterable[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]); 0.0 without samples."""
    data = sorted(float(s) for s in samples)
    if not data:
        return 0.0
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


@dataclass(frozen=True)
class UrzaRecord:
    """One catalogue row. ``descriptor`` returns a fresh message on each access."""

    blueprint_id: str
    name: str
    tier: int
    descriptor_json: str
    artifact_path: str
    checksum: str
    guard_digest: str
    compile_ms: float
    prewarm_samples: tuple[float, ...]
    file_size: int
    mtime_ns: int
    d: int
    dtype: str
    updated_at: float

    @property
    def descriptor(self) -> leyline_pb2.BlueprintDescriptor:
        return json_format.Parse(self.descriptor_json, leyline_pb2.BlueprintDescriptor())

    @property
    def artifact_ref(self) -> str:
        return fmt.artifact_ref(self.blueprint_id, self.checksum)

    @property
    def prewarm_p50_ms(self) -> float:
        return percentile(self.prewarm_samples, 50)

    @property
    def prewarm_p95_ms(self) -> float:
        return percentile(self.prewarm_samples, 95)


@dataclass(frozen=True)
class ArtifactInfo:
    """What a KernelArtifactReady needs."""

    blueprint_id: str
    artifact_ref: str
    checksum: str
    guard_digest: str
    prewarm_p50_ms: float
    prewarm_p95_ms: float

    @classmethod
    def of(cls, record: UrzaRecord) -> ArtifactInfo:
        return cls(
            blueprint_id=record.blueprint_id,
            artifact_ref=record.artifact_ref,
            checksum=record.checksum,
            guard_digest=record.guard_digest,
            prewarm_p50_ms=record.prewarm_p50_ms,
            prewarm_p95_ms=record.prewarm_p95_ms,
        )


@dataclass
class MaintenanceReport:
    """What one sweep removed (orphan artifacts, stale temp files) and which rows lost their file."""

    removed_orphans: list[str] = field(default_factory=list)
    removed_temp: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    kept_recent: int = 0
