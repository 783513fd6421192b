"""Urza: the kernel library (SQL catalogue + verified artifacts on disk).

Storage
-------
* Catalogue: table ``urza_kernels`` in SQLite or PostgreSQL
  (:mod:`esper.urza.catalog`: schema, engine, additive migration).
* Artifacts: ``<artifact_dir>/<blueprint_id>/<checksum[:16]>.safetensors``
  (format: :mod:`esper.urza.artifact`), rows store the path *relative* to the
  artifact dir, so every process sharing the directory resolves it.

Consistency
-----------
``save`` writes the file first (atomic: temp, fsync, rename, fsync dir) and
then the row in one transaction. A crash in between leaves an orphan file and
the previous row untouched - never a row without its file. Orphans and stale
temp files older than a grace period are removed by :meth:`maintenance`
(:mod:`esper.urza.maintenance`, also run at start). Rows whose file vanished
are *reported*, never deleted; loading them raises ``ArtifactNotFound``.

Replicas may share the artifact dir (and must then share the catalogue):
an existing file is never rewritten (paths are content addressed, so a save
of bytes already there leaves the file as it is), and a file is removed only
after a re-check, under the blueprint's database lock, that no row names it;
``save`` checks under that lock that its file still exists before committing
the row, writing it again if a peer's sweep removed it.
Nothing ever expires rows or files: the TTL only evicts entries from the
in-memory kernel cache.

Integrity
---------
The SHA-256 of each artifact is recorded at save and checked before any
parse on load (``ChecksumMismatch``; nothing is loaded). :meth:`verify_artifact`
checks checksum, manifest, guard digest and header without torch (what the
control plane does), remembers verified files by (path, size, mtime_ns,
inode) and never re-hashes an unchanged file. ``save`` and the ``load``
methods also build the module (torch, imported only by them), so a saved
artifact is known to load and a loaded one to fit its family.

Caching
-------
``list_all`` / ``list_by_tier`` / ``get`` always query the database. Decoded
tensors are kept in an LRU keyed by (blueprint_id, checksum); every load
builds a **new** module from them, so no two callers share a module
(:mod:`esper.urza.caches`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry
from sqlalchemy import delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from esper.core.logs import get_logger
from esper.leyline import leyline_pb2
from esper.urza import artifact as fmt
from esper.urza import catalog
from esper.urza.caches import KernelCache, VerifiedFiles, stat_key
from esper.urza.catalog import kernels_table, make_engine, normalize_database_url
from esper.urza.errors import (
    ArtifactNotFound,
    ChecksumMismatch,
    CorruptArtifact,
    MissingArtifact,
    UrzaError,
)
from esper.urza.loader import ArtifactLoader
from esper.urza.maintenance import remove_if_unreferenced, sweep
from esper.urza.metrics import LibraryMetrics
from esper.urza.records import ArtifactInfo, MaintenanceReport, UrzaRecord

if TYPE_CHECKING:
    from torch import nn

log = get_logger(__name__)

DEFAULT_SWEEP_GRACE_SECONDS = 300.0
T = TypeVar("T")


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
        catalog.ensure_schema(self._engine)
        self._max_prewarm = max(1, int(max_prewarm_samples))
        self._cache = KernelCache(cache_size, cache_ttl_seconds)
        self._verified = VerifiedFiles()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = LibraryMetrics(self.registry)
        self._loader = ArtifactLoader(self._metrics, self._cache, self._verified)
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

    @contextmanager
    def _operation(self, name: str) -> Iterator[None]:
        """Time a lookup and count its failure: Urza errors by reason, storage errors re-raised as is.

        Database and IO failures are never turned into a miss: the caller
        must see that the library itself is broken.
        """
        started = time.perf_counter()
        try:
            yield
        except UrzaError as exc:
            raise self._metrics.error(exc) from None
        except (SQLAlchemyError, OSError) as exc:
            self._metrics.storage_error(exc)
            raise
        finally:
            self._metrics.observe(name, started)

    def metrics_snapshot(self) -> dict[str, Any]:
        snap = self._metrics.snapshot()
        snap["cache_expired"] = self._cache.expired
        snap["verify_cache_hits"] = self._verified.hits
        snap["cached_kernels"] = len(self._cache)
        return snap

    # -- catalogue queries (always the database) ----------------------------------------

    def get(self, blueprint_id: str) -> UrzaRecord | None:
        with self._engine.connect() as conn:
            row = conn.execute(
                select(kernels_table).where(kernels_table.c.blueprint_id == blueprint_id)
            ).first()
        return None if row is None else catalog.record_from_row(row)

    def list_all(self) -> list[UrzaRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(kernels_table).order_by(kernels_table.c.blueprint_id)).all()
        return [catalog.record_from_row(r) for r in rows]

    def list_by_tier(self, tier: int) -> list[UrzaRecord]:
        names = [catalog.tier_name(tier), str(int(tier))]
        with self._engine.connect() as conn:
            rows = conn.execute(
                select(kernels_table)
                .where(kernels_table.c.tier.in_(names))
                .order_by(kernels_table.c.blueprint_id)
            ).all()
        return [catalog.record_from_row(r) for r in rows]

    def __contains__(self, blueprint_id: object) -> bool:
        return isinstance(blueprint_id, str) and self.get(blueprint_id) is not None

    def _catalogued(self, blueprint_id: str) -> UrzaRecord:
        """The row for ``blueprint_id``; raises ``MissingArtifact`` / ``CorruptArtifact`` without one."""
        record = self.get(blueprint_id)
        if record is None:
            raise MissingArtifact(f"no catalogue entry for {blueprint_id}", blueprint_id=blueprint_id)
        if not record.checksum:
            message = f"catalogue entry for {blueprint_id} has no checksum"
            raise CorruptArtifact(message, blueprint_id=blueprint_id)
        return record

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
        tensors loaded into their family's module, which needs torch).
        """
        bid = descriptor.blueprint_id
        src = Path(artifact_path)
        try:
            blob = src.read_bytes()
        except FileNotFoundError:
            raise self._metrics.error(ArtifactNotFound(f"{src} does not exist", blueprint_id=bid)) from None
        checksum = self._loader.hash(blob)
        if catalog_update is not None and catalog_update.checksum and catalog_update.checksum != checksum:
            raise self._metrics.error(
                ChecksumMismatch(f"{src} does not match the catalog update", blueprint_id=bid)
            )
        expected_guard = catalog_update.guard_digest if catalog_update is not None else ""
        from esper.urza.modules import load_bytes  # torch: a save proves the kernel loads

        try:
            module, manifest = load_bytes(
                blob, expected_guard=expected_guard or None, source=str(src), blueprint_id=bid
            )
        except UrzaError as exc:
            raise self._metrics.error(exc) from None
        del module
        rel = fmt.relative_path(bid, checksum)
        dest = self.root / rel
        self._store_file(dest, blob, checksum)

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
        # The blueprint's lock keeps a peer's sweep from removing the file between this
        # check and the commit of the row that names it (see esper.urza.maintenance).
        with catalog.locked_transaction(self._engine, catalog.artifact_lock_key(bid)) as conn:
            if not dest.is_file():  # removed by a peer's sweep before the row existed
                fmt.write_atomic(dest, blob)
            st = dest.stat()
            row = catalog.row_for_save(
                descriptor,
                manifest,
                artifact_path=rel,
                checksum=checksum,
                compile_ms=compile_ms,
                prewarm_samples=samples[-self._max_prewarm :],
                st=st,
            )
            old_path = catalog.artifact_path_of(conn, bid)
            self._write_row(conn, row)
        self._verified.remember(str(dest), stat_key(st), checksum)
        if old_path and old_path != rel:
            self._remove_unreferenced(old_path)
        record = self.get(bid)
        assert record is not None
        return record

    def _store_file(self, dest: Path, blob: bytes, checksum: str) -> None:
        """Write the artifact unless its bytes are already there.

        Paths are content addressed, so an existing file with the right hash
        is the artifact: it is left as it is (same inode, same mtime) rather
        than replaced under a replica that may be reading it. A file with
        other bytes at that path is damaged and is replaced atomically.
        """
        try:
            if dest.stat().st_size == len(blob) and fmt.sha256_hex(dest.read_bytes()) == checksum:
                return
        except FileNotFoundError:
            pass
        fmt.write_atomic(dest, blob)

    def _write_row(self, conn: Connection, row: Mapping[str, Any]) -> None:
        """Upsert one row (inside the caller's transaction); a seam tests use to simulate a crash."""
        catalog.upsert_row(conn, row)

    def _remove_unreferenced(self, rel: str) -> None:
        """Remove a superseded or deleted artifact once no row names it (under the blueprint's lock)."""
        try:
            remove_if_unreferenced(self.root, self._engine, rel)
        except (OSError, UrzaError, SQLAlchemyError) as exc:
            log.warning("urza could not remove superseded artifact", path=rel, error=str(exc))

    def delete(self, blueprint_id: str) -> bool:
        """Remove the row, then its file (a crash in between leaves an orphan file, never a dangling row)."""
        with self._engine.begin() as conn:
            rel = catalog.artifact_path_of(conn, blueprint_id)
            if rel is None:
                return False
            conn.execute(delete(kernels_table).where(kernels_table.c.blueprint_id == blueprint_id))
        self._remove_unreferenced(rel)
        self._cache.drop_blueprint(blueprint_id)
        return True

    # -- verification (prefetch path) ------------------------------------------------------

    def verify_artifact(self, blueprint_id: str) -> ArtifactInfo:
        """Check the catalogued artifact (without torch) and describe it for KernelArtifactReady.

        An unchanged file (same path, size, mtime_ns and inode as when it was
        last verified) is never hashed again. Raises ``MissingArtifact``,
        ``ArtifactNotFound``, ``ChecksumMismatch`` or ``CorruptArtifact``.
        """
        with self._operation("verify"):
            record = self._catalogued(blueprint_id)
            self._loader.verify_file(
                self._path(record), record.checksum, record.guard_digest, blueprint_id, record.artifact_path
            )
            return ArtifactInfo.of(record)

    # -- loading -------------------------------------------------------------------------------

    def load(self, blueprint_id: str) -> nn.Module:
        """A verified, freshly built module for the catalogued kernel (never a shared instance)."""
        with self._operation("load"):
            record = self._catalogued(blueprint_id)
            return self._loader.module(
                blueprint_id, record.checksum, record.guard_digest, self._path(record), record.artifact_path
            )

    def load_verified(self, artifact_ref: str, checksum: str, guard_digest: str) -> nn.Module:
        """Load the artifact a KernelArtifactReady names, verifying checksum and guard first.

        Needs no catalogue row: the reference resolves under the shared
        artifact directory.
        """
        with self._operation("load_verified"):
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
            return self._loader.module(bid, checksum, guard_digest, self.root / rel, artifact_ref)

    # -- maintenance -------------------------------------------------------------------------

    def maintenance(self, *, grace_seconds: float = DEFAULT_SWEEP_GRACE_SECONDS) -> MaintenanceReport:
        """Remove orphan artifacts and stale temp files older than ``grace_seconds``; report dangling rows.

        See :func:`esper.urza.maintenance.sweep`; the grace period protects a
        concurrent ``save`` between its file and its row.
        """
        return sweep(self.root, self._engine, grace_seconds)

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
