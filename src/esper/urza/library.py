"""Urza: the kernel library (SQL catalogue + verified artifacts on disk).

Storage
-------
* Catalogue: table ``urza_kernels`` through SQLAlchemy 2 - a SQLite file by
  default (WAL journal, busy timeout, set on every connection) or PostgreSQL
  (``postgresql://`` is rewritten to the psycopg 3 driver). The schema is
  created at start; ``urza_schema_version`` records the version and missing
  columns are added (additive migration).
* Artifacts: ``<artifact_dir>/<blueprint_id>/<checksum[:16]>.safetensors``
  (format: :mod:`esper.urza.artifact`), rows store the path *relative* to the
  artifact dir, so every process sharing the directory resolves it.

Consistency
-----------
``save`` writes the file first (atomic: temp, fsync, rename, fsync dir) and
then the row in one transaction. A crash in between leaves an orphan file and
the previous row untouched - never a row without its file. Orphans and stale
temp files older than a grace period are removed by :meth:`maintenance`
(also run at start). Rows whose file vanished are *reported*, never deleted;
loading them raises ``ArtifactNotFound``. Nothing ever expires rows or files:
the TTL only evicts entries from the in-memory kernel cache.

Integrity
---------
The SHA-256 of each artifact is recorded at save and checked before any
parse on load (``ChecksumMismatch``; nothing is loaded). :meth:`verify_artifact`
remembers verified files by (path, size, mtime_ns, inode) and never re-hashes
an unchanged file.

Caching
-------
``list_all`` / ``list_by_tier`` / ``get`` always query the database. Decoded
tensors are kept in an LRU keyed by (blueprint_id, checksum); every load
builds a **new** module from them, so no two callers share a module.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import SQLAlchemyError
from torch import nn

from esper.core.logs import get_logger
from esper.leyline import leyline_pb2
from esper.urza import artifact as fmt
from esper.urza.errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    CorruptArtifact,
    GuardMismatch,
    MissingArtifact,
    UrzaError,
)

log = get_logger(__name__)

SCHEMA_VERSION = 1
DEFAULT_SWEEP_GRACE_SECONDS = 300.0
T = TypeVar("T")

_metadata = MetaData()
kernels_table = Table(
    "urza_kernels",
    _metadata,
    Column("blueprint_id", String(64), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("tier", String(40), nullable=False),
    Column("descriptor_json", Text, nullable=False),
    Column("artifact_path", String(255), nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("guard_digest", String(64), nullable=False),
    Column("compile_ms", Float, nullable=False),
    Column("prewarm_json", Text, nullable=False),
    Column("file_size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("width", Integer, nullable=False),
    Column("dtype", String(16), nullable=False),
    Column("updated_at", Float, nullable=False),
)
version_table = Table("urza_schema_version", _metadata, Column("version", Integer, primary_key=True))


def percentile(samples: Iterable[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]); 0.0 without samples."""
    data = sorted(float(s) for s in samples)
    if not data:
        return 0.0
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def normalize_database_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgresql://`` / ``postgres://`` URLs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, *, busy_timeout_ms: int = 5000) -> Engine:
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _ensure_schema(engine: Engine) -> None:
    _metadata.create_all(engine, checkfirst=True)
    with engine.begin() as conn:
        existing = {c["name"] for c in inspect(conn).get_columns(kernels_table.name)}
        for column in kernels_table.columns:
            if column.name not in existing:  # additive migration: new nullable column
                ddl = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f'ALTER TABLE {kernels_table.name} ADD COLUMN "{column.name}" {ddl}'))
        current = conn.execute(select(version_table.c.version)).scalars().all()
        if not current:
            conn.execute(version_table.insert().values(version=SCHEMA_VERSION))
        elif max(current) < SCHEMA_VERSION:  # pragma: no cover - first version
            conn.execute(version_table.update().values(version=SCHEMA_VERSION))


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


@dataclass
class MaintenanceReport:
    removed_orphans: list[str] = field(default_factory=list)
    removed_temp: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    kept_recent: int = 0


@dataclass
class _Cached:
    manifest: fmt.Manifest
    tensors: dict[str, torch.Tensor]
    stored_at: float


@dataclass(frozen=True)
class _Verified:
    stat_key: tuple[int, int, int]
    checksum: str


def _tier_name(tier: int) -> str:
    return leyline_pb2.BlueprintTier.Name(cast(Any, tier))


def _tier_value(text_value: str) -> int:
    return int(text_value) if text_value.isdigit() else int(leyline_pb2.BlueprintTier.Value(text_value))


class UrzaLibrary:
    """The kernel catalogue and artifact store."""

    def __init__(
        self,
        artifact_dir: str | os.PathLike[str],
        database_url: str | None = None,
        *,
        cache_size: int = 64,
        cache_ttl_seconds: float | None = None,
        max_prewarm_samples: int = 20,
        registry: CollectorRegistry | None = None,
        sweep_grace_seconds: float | None = DEFAULT_SWEEP_GRACE_SECONDS,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self.root = Path(artifact_dir).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.database_url = normalize_database_url(database_url or f"sqlite:///{self.root / 'catalog.db'}")
        self._engine = make_engine(self.database_url, busy_timeout_ms=busy_timeout_ms)
        _ensure_schema(self._engine)
        self._cache_size = max(0, int(cache_size))
        self._ttl = cache_ttl_seconds
        self._max_prewarm = max(1, int(max_prewarm_samples))
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
        self._verified: dict[str, _Verified] = {}
        self._counts: dict[str, int] = {
            "cache_hits": 0,
            "cache_misses": 0,
            "cache_errors": 0,
            "cache_expired": 0,
            "hash_computations": 0,
            "verify_cache_hits": 0,
        }
        self._errors_by_reason: dict[str, int] = {}
        self._last_latency_ms = 0.0
        self.registry = registry if registry is not None else CollectorRegistry()
        self._m_hits = Counter(
            "urza_kernel_cache_hits", "Kernel loads served from the LRU", registry=self.registry
        )
        self._m_misses = Counter(
            "urza_kernel_cache_misses", "Kernel loads that read the artifact file", registry=self.registry
        )
        self._m_errors = Counter(
            "urza_errors", "Urza lookup/verification errors", ["reason"], registry=self.registry
        )
        self._m_hashes = Counter(
            "urza_artifact_hashes", "Full SHA-256 computations of artifact files", registry=self.registry
        )
        self._m_latency = Histogram(
            "urza_lookup_latency_seconds",
            "Kernel lookup+load latency",
            ["operation"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        if sweep_grace_seconds is not None:
            report = self.maintenance(grace_seconds=sweep_grace_seconds)
            if report.removed_orphans or report.removed_temp or report.missing_files:
                log.warning(
                    "urza startup sweep",
                    removed_orphans=report.removed_orphans,
                    removed_temp=report.removed_temp,
                    missing_files=report.missing_files,
                )

    @classmethod
    def from_settings(
        cls, settings: Any, *, registry: CollectorRegistry | None = None, **kwargs: Any
    ) -> UrzaLibrary:
        """Build from ``EsperSettings`` (URZA_ARTIFACT_DIR, URZA_DATABASE_URL, URZA_CACHE_TTL_SECONDS)."""
        return cls(
            settings.urza_artifact_dir,
            settings.urza_database_url,
            cache_ttl_seconds=settings.urza_cache_ttl_seconds,
            registry=registry,
            **kwargs,
        )

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> UrzaLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths ------------------------------------------------------------------------

    def resolve_ref(self, ref: str) -> Path:
        """Map an ``urza://`` reference or relative path to a file under the artifact dir."""
        return self.root / fmt.ref_to_relative(ref)

    def _path(self, record: UrzaRecord) -> Path:
        return self.root / fmt.ref_to_relative(record.artifact_path)

    # -- errors and metrics -------------------------------------------------------------

    def _error(self, exc: UrzaError) -> UrzaError:
        with self._lock:
            self._counts["cache_errors"] += 1
            self._errors_by_reason[exc.reason] = self._errors_by_reason.get(exc.reason, 0) + 1
        self._m_errors.labels(exc.reason).inc()
        return exc

    def _storage_error(self, exc: BaseException) -> None:
        """Database and IO failures are counted and logged, then re-raised (never turned into a miss)."""
        reason = "database_error" if isinstance(exc, SQLAlchemyError) else "io_error"
        with self._lock:
            self._counts["cache_errors"] += 1
            self._errors_by_reason[reason] = self._errors_by_reason.get(reason, 0) + 1
        self._m_errors.labels(reason).inc()
        log.error("urza storage error", reason=reason, error=str(exc))

    def _observe(self, operation: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self._m_latency.labels(operation).observe(elapsed)
        self._last_latency_ms = elapsed * 1000.0
        return self._last_latency_ms

    def _hash(self, blob: bytes) -> str:
        with self._lock:
            self._counts["hash_computations"] += 1
        self._m_hashes.inc()
        return fmt.sha256_hex(blob)

    def metrics_snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = dict(self._counts)
            snap["lookup_latency_ms"] = self._last_latency_ms
            snap["errors_by_reason"] = dict(self._errors_by_reason)
            snap["cached_kernels"] = len(self._cache)
        return snap

    # -- catalogue queries (always the database) ----------------------------------------

    @staticmethod
    def _record(row: Any) -> UrzaRecord:
        m = row._mapping
        return UrzaRecord(
            blueprint_id=m["blueprint_id"],
            name=m["name"],
            tier=_tier_value(m["tier"]),
            descriptor_json=m["descriptor_json"],
            artifact_path=m["artifact_path"],
            checksum=m["checksum"] or "",
            guard_digest=m["guard_digest"] or "",
            compile_ms=float(m["compile_ms"] or 0.0),
            prewarm_samples=tuple(float(s) for s in json.loads(m["prewarm_json"] or "[]")),
            file_size=int(m["file_size"] or 0),
            mtime_ns=int(m["mtime_ns"] or 0),
            d=int(m["width"] or 0),
            dtype=m["dtype"] or "",
            updated_at=float(m["updated_at"] or 0.0),
        )

    def get(self, blueprint_id: str) -> UrzaRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(kernels_table).where(kernels_table.c.blueprint_id == blueprint_id)
            ).first()
        return None if row is None else self._record(row)

    def list_all(self) -> list[UrzaRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(kernels_table).order_by(kernels_table.c.blueprint_id)).all()
        return [self._record(r) for r in rows]

    def list_by_tier(self, tier: int) -> list[UrzaRecord]:
        names = [_tier_name(tier), str(int(tier))]
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(kernels_table)
                .where(kernels_table.c.tier.in_(names))
                .order_by(kernels_table.c.blueprint_id)
            ).all()
        return [self._record(r) for r in rows]

    def __contains__(self, blueprint_id: object) -> bool:
        return isinstance(blueprint_id, str) and self.get(blueprint_id) is not None

    # -- save ---------------------------------------------------------------------------

    def save(
        self,
        descriptor: leyline_pb2.BlueprintDescriptor,
        artifact_path: str | os.PathLike[str],
        catalog_update: leyline_pb2.KernelCatalogUpdate | None = None,
        *,
        prewarm_samples: Iterable[float] | None = None,
        compile_ms: float | None = None,
    ) -> UrzaRecord:
        """Store an artifact and its row: the file first (atomically), then the row in one transaction.

        The artifact is fully verified before anything is written (checksum
        against ``catalog_update.checksum`` when given, manifest, guard,
        tensors against the family).
        """
        bid = descriptor.blueprint_id
        src = Path(artifact_path)
        try:
            blob = src.read_bytes()
        except FileNotFoundError:
            raise self._error(ArtifactNotFound(f"{src} does not exist", blueprint_id=bid)) from None
        checksum = self._hash(blob)
        if catalog_update is not None and catalog_update.checksum and catalog_update.checksum != checksum:
            raise self._error(ChecksumMismatch(f"{src} does not match the catalog update", blueprint_id=bid))
        expected_guard = catalog_update.guard_digest if catalog_update is not None else ""
        try:
            module, manifest = fmt.load_bytes(
                blob, expected_guard=expected_guard or None, source=str(src), blueprint_id=bid
            )
        except UrzaError as exc:
            raise self._error(exc) from None
        del module
        rel = fmt.relative_path(bid, checksum)
        dest = self.root / rel
        if not (dest.exists() and src.resolve() == dest.resolve()):
            fmt.write_atomic(dest, blob)
        st = dest.stat()

        previous = self.get(bid)
        samples = [float(s) for s in prewarm_samples] if prewarm_samples is not None else []
        if not samples and catalog_update is not None and catalog_update.prewarm_ms > 0:
            samples = [float(catalog_update.prewarm_ms)]
        if not samples and previous is not None and previous.checksum == checksum:
            samples = list(previous.prewarm_samples)
        if compile_ms is None:
            if catalog_update is not None and catalog_update.compile_ms > 0:
                compile_ms = float(catalog_update.compile_ms)
            elif previous is not None and previous.checksum == checksum:
                compile_ms = previous.compile_ms
            else:
                compile_ms = 0.0
        row = {
            "blueprint_id": bid,
            "name": descriptor.name,
            "tier": _tier_name(descriptor.tier),
            "descriptor_json": json_format.MessageToJson(
                descriptor, preserving_proto_field_name=True, indent=None, sort_keys=True
            ),
            "artifact_path": rel,
            "checksum": checksum,
            "guard_digest": manifest.guard_digest,
            "compile_ms": float(compile_ms),
            "prewarm_json": json.dumps(samples[-self._max_prewarm :]),
            "file_size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "width": manifest.d,
            "dtype": manifest.dtype,
            "updated_at": time.time(),
        }
        with self._engine.begin() as conn:
            old_path = conn.execute(
                select(kernels_table.c.artifact_path).where(kernels_table.c.blueprint_id == bid)
            ).scalar()
            self._write_row(conn, row)
        with self._lock:
            self._verified[str(dest)] = _Verified(self._stat_key(st), checksum)
        if old_path and old_path != rel:
            self._remove_unreferenced(old_path)
        record = self.get(bid)
        assert record is not None
        return record

    def _write_row(self, conn: Connection, row: Mapping[str, Any]) -> None:
        """Upsert one row (inside the caller's transaction)."""
        dialect = conn.dialect.name
        values = dict(row)
        if dialect in ("sqlite", "postgresql"):
            from sqlalchemy.dialects import postgresql, sqlite

            dialect_insert: Any = sqlite.insert if dialect == "sqlite" else postgresql.insert
            stmt = dialect_insert(kernels_table).values(**values)
            stmt = stmt.on_conflict_do_update(
                index_elements=[kernels_table.c.blueprint_id],
                set_={k: stmt.excluded[k] for k in values if k != "blueprint_id"},
            )
            conn.execute(stmt)
        else:  # pragma: no cover - other dialects
            conn.execute(delete(kernels_table).where(kernels_table.c.blueprint_id == values["blueprint_id"]))
            conn.execute(kernels_table.insert().values(**values))

    def _remove_unreferenced(self, rel: str) -> None:
        with self._engine.connect() as conn:
            still = conn.execute(
                select(kernels_table.c.blueprint_id).where(kernels_table.c.artifact_path == rel)
            ).first()
        if still is None:
            try:
                (self.root / fmt.ref_to_relative(rel)).unlink(missing_ok=True)
            except (OSError, UrzaError) as exc:
                log.warning("urza could not remove superseded artifact", path=rel, error=str(exc))

    def delete(self, blueprint_id: str) -> bool:
        """Remove the row, then its file (a crash in between leaves an orphan file, never a dangling row)."""
        with self._engine.begin() as conn:
            rel = conn.execute(
                select(kernels_table.c.artifact_path).where(kernels_table.c.blueprint_id == blueprint_id)
            ).scalar()
            if rel is None:
                return False
            conn.execute(delete(kernels_table).where(kernels_table.c.blueprint_id == blueprint_id))
        self._remove_unreferenced(rel)
        with self._lock:
            for key in [k for k in self._cache if k[0] == blueprint_id]:
                del self._cache[key]
        return True

    # -- verification (prefetch path) ------------------------------------------------------

    @staticmethod
    def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def verify_artifact(self, blueprint_id: str) -> ArtifactInfo:
        """Check the catalogued artifact and describe it for KernelArtifactReady.

        An unchanged file (same path, size, mtime_ns and inode as when it was
        last verified) is never hashed again. Raises ``MissingArtifact``,
        ``ArtifactNotFound``, ``ChecksumMismatch`` or ``CorruptArtifact``.
        """
        started = time.perf_counter()
        try:
            record = self.get(blueprint_id)
            if record is None:
                raise MissingArtifact(f"no catalogue entry for {blueprint_id}", blueprint_id=blueprint_id)
            self._verified_path(record)
            return ArtifactInfo(
                blueprint_id=blueprint_id,
                artifact_ref=record.artifact_ref,
                checksum=record.checksum,
                guard_digest=record.guard_digest,
                prewarm_p50_ms=record.prewarm_p50_ms,
                prewarm_p95_ms=record.prewarm_p95_ms,
            )
        except UrzaError as exc:
            raise self._error(exc) from None
        except (SQLAlchemyError, OSError) as exc:
            self._storage_error(exc)
            raise
        finally:
            self._observe("verify", started)

    def _verified_path(self, record: UrzaRecord) -> Path:
        bid = record.blueprint_id
        if not record.checksum:
            raise CorruptArtifact(f"catalogue entry for {bid} has no checksum", blueprint_id=bid)
        path = self._path(record)
        key = str(path)
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed by the ``with`` right below
        except FileNotFoundError:
            raise ArtifactNotFound(f"{record.artifact_path} is missing", blueprint_id=bid) from None
        with fh:
            stat_key = self._stat_key(os.fstat(fh.fileno()))
            with self._lock:
                known = self._verified.get(key)
                if known is not None and known.stat_key == stat_key and known.checksum == record.checksum:
                    self._counts["verify_cache_hits"] += 1
                    return path
            blob = fh.read()
        self._load_blob(blob, record.checksum, record.guard_digest, bid, record.artifact_path)
        with self._lock:
            self._verified[key] = _Verified(stat_key, record.checksum)
        return path

    def _load_blob(
        self, blob: bytes, checksum: str, guard: str | None, bid: str, source: str
    ) -> tuple[fmt.Manifest, dict[str, torch.Tensor], nn.Module]:
        """Hash, parse, decode and build; caches the verified tensors under (bid, checksum)."""
        actual = self._hash(blob)
        if actual != checksum:
            raise ChecksumMismatch(
                f"{source}: sha256 {actual[:16]}… != recorded {checksum[:16]}…", blueprint_id=bid
            )
        manifest = fmt.parse_manifest(blob, source=source)
        if manifest.blueprint_id != bid:
            raise CorruptArtifact(f"{source} holds {manifest.blueprint_id}, not {bid}", blueprint_id=bid)
        if guard and manifest.guard_digest != guard:
            raise GuardMismatch(f"{source}: guard digest differs from the expected one", blueprint_id=bid)
        tensors = fmt.decode_tensors(blob, manifest, source=source)
        module = fmt.instantiate(manifest, tensors, source=source)  # names/shapes/dtypes fit the family
        self._cache_put((bid, checksum), manifest, tensors)  # the module holds its own copies
        return manifest, tensors, module

    # -- kernel cache ------------------------------------------------------------------------

    def _cache_put(
        self, key: tuple[str, str], manifest: fmt.Manifest, tensors: dict[str, torch.Tensor]
    ) -> None:
        if self._cache_size == 0:
            return
        with self._lock:
            self._cache[key] = _Cached(manifest, tensors, time.monotonic())
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _cache_get(self, key: tuple[str, str]) -> _Cached | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            if self._ttl is not None and time.monotonic() - entry.stored_at > self._ttl:
                del self._cache[key]  # memory only: rows and files are never expired
                self._counts["cache_expired"] += 1
                return None
            self._cache.move_to_end(key)
            return entry

    def _count(self, hit: bool) -> None:
        with self._lock:
            self._counts["cache_hits" if hit else "cache_misses"] += 1
        (self._m_hits if hit else self._m_misses).inc()

    def _module(self, bid: str, checksum: str, guard: str | None, path: Path, source: str) -> nn.Module:
        entry = self._cache_get((bid, checksum))
        if entry is not None:
            if guard and entry.manifest.guard_digest != guard:
                raise GuardMismatch(f"{source}: guard digest differs from the expected one", blueprint_id=bid)
            self._count(hit=True)
            return fmt.instantiate(entry.manifest, entry.tensors, source=source)
        self._count(hit=False)
        try:
            with open(path, "rb") as fh:
                stat_key = self._stat_key(os.fstat(fh.fileno()))
                blob = fh.read()
        except FileNotFoundError:
            raise ArtifactNotFound(f"{source} is missing", blueprint_id=bid) from None
        _, _, module = self._load_blob(blob, checksum, guard, bid, source)
        with self._lock:
            self._verified[str(path)] = _Verified(stat_key, checksum)
        return module

    def load(self, blueprint_id: str) -> nn.Module:
        """A verified, freshly built module for the catalogued kernel (never a shared instance)."""
        started = time.perf_counter()
        try:
            record = self.get(blueprint_id)
            if record is None:
                raise MissingArtifact(f"no catalogue entry for {blueprint_id}", blueprint_id=blueprint_id)
            if not record.checksum:
                raise CorruptArtifact(
                    f"catalogue entry for {blueprint_id} has no checksum", blueprint_id=blueprint_id
                )
            return self._module(
                blueprint_id, record.checksum, record.guard_digest, self._path(record), record.artifact_path
            )
        except UrzaError as exc:
            raise self._error(exc) from None
        except (SQLAlchemyError, OSError) as exc:
            self._storage_error(exc)
            raise
        finally:
            self._observe("load", started)

    def load_verified(self, artifact_ref: str, checksum: str, guard_digest: str) -> nn.Module:
        """Load the artifact a KernelArtifactReady names, verifying checksum and guard first.

        Needs no catalogue row: the reference resolves under the shared
        artifact directory.
        """
        started = time.perf_counter()
        try:
            rel = fmt.ref_to_relative(artifact_ref)
            bid = rel.split("/", 1)[0]
            if not checksum or not guard_digest:
                raise ChecksumMismatch(
                    f"{artifact_ref}: checksum and guard digest are required", blueprint_id=bid
                )
            if Path(rel).name != f"{checksum[:16]}{fmt.SUFFIX}":
                raise ChecksumMismatch(
                    f"{artifact_ref} does not name checksum {checksum[:16]}…", blueprint_id=bid
                )
            return self._module(bid, checksum, guard_digest, self.root / rel, artifact_ref)
        except UrzaError as exc:
            raise self._error(exc) from None
        except (SQLAlchemyError, OSError) as exc:
            self._storage_error(exc)
            raise
        finally:
            self._observe("load_verified", started)

    # -- maintenance -------------------------------------------------------------------------

    def maintenance(self, *, grace_seconds: float = DEFAULT_SWEEP_GRACE_SECONDS) -> MaintenanceReport:
        """Remove orphan artifacts and stale temp files older than ``grace_seconds``; report dangling rows.

        Files are listed before rows are read, so an artifact whose row is
        committed meanwhile is never mistaken for an orphan; the grace period
        protects a concurrent ``save`` between its file and its row.
        """
        report = MaintenanceReport()
        now = time.time()
        files: list[tuple[str, Path]] = []
        temps: list[Path] = []
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for entry in sub.iterdir():
                if entry.name.startswith(fmt.TEMP_PREFIX):
                    temps.append(entry)
                elif entry.name.endswith(fmt.SUFFIX) and entry.is_file():
                    files.append((f"{sub.name}/{entry.name}", entry))
        with self._engine.connect() as conn:
            referenced = set(conn.execute(select(kernels_table.c.artifact_path)).scalars())
        for rel, path in files:
            if rel in referenced:
                continue
            try:
                if now - path.stat().st_mtime < grace_seconds:
                    report.kept_recent += 1
                    continue
                path.unlink()
                report.removed_orphans.append(rel)
            except FileNotFoundError:
                continue
        for path in temps:
            try:
                if now - path.stat().st_mtime < grace_seconds:
                    report.kept_recent += 1
                    continue
                path.unlink()
                report.removed_temp.append(f"{path.parent.name}/{path.name}")
            except FileNotFoundError:
                continue
        for rel in sorted(referenced):
            try:
                if not (self.root / fmt.ref_to_relative(rel)).is_file():
                    report.missing_files.append(rel)
            except UrzaError:
                report.missing_files.append(rel)
        return report

    # -- async wrappers (blocking work off the event loop) --------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def asave(
        self,
        descriptor: leyline_pb2.BlueprintDescriptor,
        artifact_path: str | os.PathLike[str],
        catalog_update: leyline_pb2.KernelCatalogUpdate | None = None,
        **kwargs: Any,
    ) -> UrzaRecord:
        return await self._run(self.save, descriptor, artifact_path, catalog_update, **kwargs)

    async def aget(self, blueprint_id: str) -> UrzaRecord | None:
        return await self._run(self.get, blueprint_id)

    async def alist_all(self) -> list[UrzaRecord]:
        return await self._run(self.list_all)

    async def alist_by_tier(self, tier: int) -> list[UrzaRecord]:
        return await self._run(self.list_by_tier, tier)

    async def aload(self, blueprint_id: str) -> nn.Module:
        return await self._run(self.load, blueprint_id)

    async def averify_artifact(self, blueprint_id: str) -> ArtifactInfo:
        return await self._run(self.verify_artifact, blueprint_id)

    async def aload_verified(self, artifact_ref: str, checksum: str, guard_digest: str) -> nn.Module:
        return await self._run(self.load_verified, artifact_ref, checksum, guard_digest)

    async def amaintenance(self, *, grace_seconds: float = DEFAULT_SWEEP_GRACE_SECONDS) -> MaintenanceReport:
        return await self._run(self.maintenance, grace_seconds=grace_seconds)
