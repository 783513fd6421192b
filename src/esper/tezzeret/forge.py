"""Tezzeret forge: compile the catalogue (or a selection) for a slot width into Urza.

Crash safety and resume
-----------------------
The forge keeps an append-only JSON-lines log (default
``<artifact_dir>/forge-log.jsonl``; each line fsynced). After a kernel's
artifact *and* its catalogue row are saved it appends
``{"event": "done", "blueprint_id", "d", "dtype", "checksum"}``. A rerun for
the same ``d`` and ``dtype`` skips every id whose last ``done`` checksum still
matches the catalogue row, so a crash after K kernels costs only the kernel
that was in flight. A torn last line (crash while appending) is ignored.
``force=True`` appends a ``reset`` record and recompiles everything selected.

Notifications
-------------
``progress(ForgeProgress)`` is called after each id (compiled or skipped).
``on_catalog_update(update)`` - an async callable, e.g. a bus publisher - is
awaited after each saved kernel; its failures are logged and reported in
``ForgeReport.publish_failures`` but never undo or stop the forge.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.core.logs import get_logger
from esper.karn import KarnCatalog, ids_in
from esper.leyline import leyline_pb2
from esper.tezzeret.compiler import TezzeretCompiler
from esper.urza.artifact import fsync_dir
from esper.urza.library import UrzaLibrary

log = get_logger(__name__)

LOG_NAME = "forge-log.jsonl"

CatalogUpdateCallback = Callable[[leyline_pb2.KernelCatalogUpdate], Awaitable[Any]]


@dataclass(frozen=True)
class ForgeProgress:
    index: int  # 1-based position in this run
    total: int
    blueprint_id: str
    status: str  # "compiled" or "skipped"
    elapsed_s: float
    compile_ms: float = 0.0


ProgressCallback = Callable[[ForgeProgress], None]


@dataclass
class ForgeReport:
    d: int
    dtype: str
    compiled: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    publish_failures: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def total(self) -> int:
        return len(self.compiled) + len(self.skipped)


class ForgeLog:
    """Append-only, fsynced JSON-lines log of finished kernels."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        new = not self.path.exists()
        with open(self.path, "a+b") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # a torn line from a crash: terminate it first
                    line = "\n" + line
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        if new:
            fsync_dir(self.path.parent)

    def done(self, d: int, dtype: str) -> dict[str, str]:
        """blueprint_id → checksum of the last finished compile for (d, dtype) since the last reset."""
        finished: dict[str, str] = {}
        if not self.path.exists():
            return finished
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # torn write at a crash
                if not isinstance(rec, dict) or rec.get("d") != d or rec.get("dtype") != dtype:
                    continue
                if rec.get("event") == "reset":
                    finished.clear()
                elif rec.get("event") == "done" and isinstance(rec.get("blueprint_id"), str):
                    finished[rec["blueprint_id"]] = str(rec.get("checksum", ""))
        return finished


class TezzeretForge:
    def __init__(
        self,
        catalog: KarnCatalog,
        library: UrzaLibrary,
        compiler: TezzeretCompiler | None = None,
        *,
        log_path: str | os.PathLike[str] | None = None,
        on_catalog_update: CatalogUpdateCallback | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        self.catalog = catalog
        self.library = library
        self.compiler = compiler if compiler is not None else TezzeretCompiler(library.root, catalog=catalog)
        self.log = ForgeLog(Path(log_path) if log_path is not None else library.root / LOG_NAME)
        self.on_catalog_update = on_catalog_update
        self.progress = progress

    def pending(self, d: int, ids: Iterable[str] | None = None, *, dtype: str = "float32") -> list[str]:
        """Ids that still need compiling for (d, dtype)."""
        selected = ids_in(self.catalog, ids) if ids is not None else self.catalog.ids()
        done = self.log.done(d, dtype)
        out = []
        for bid in selected:
            record = self.library.get(bid) if bid in done else None
            if record is None or record.checksum != done[bid] or record.d != d or record.dtype != dtype:
                out.append(bid)
        return out

    async def arun(
        self,
        d: int,
        ids: Iterable[str] | None = None,
        *,
        dtype: str = "float32",
        force: bool = False,
    ) -> ForgeReport:
        started = time.perf_counter()
        selected = ids_in(self.catalog, ids) if ids is not None else self.catalog.ids()
        if force:
            await asyncio.to_thread(
                self.log.append, {"event": "reset", "d": d, "dtype": dtype, "ts": time.time()}
            )
        todo = set(await asyncio.to_thread(self.pending, d, selected, dtype=dtype))
        report = ForgeReport(d=d, dtype=dtype)
        for index, bid in enumerate(selected, start=1):
            if bid not in todo:
                report.skipped.append(bid)
                self._notify(
                    ForgeProgress(index, len(selected), bid, "skipped", time.perf_counter() - started)
                )
                continue
            update, compile_ms = await asyncio.to_thread(self._compile_and_save, bid, d, dtype)
            report.compiled.append(bid)
            if self.on_catalog_update is not None:
                try:
                    await self.on_catalog_update(update)
                except Exception as exc:  # noqa: BLE001 - a publisher failure must not stop the forge
                    report.publish_failures.append(bid)
                    log.error("forge catalog update callback failed", blueprint_id=bid, error=repr(exc))
            self._notify(
                ForgeProgress(
                    index, len(selected), bid, "compiled", time.perf_counter() - started, compile_ms
                )
            )
        report.elapsed_s = time.perf_counter() - started
        return report

    def run(
        self, d: int, ids: Iterable[str] | None = None, *, dtype: str = "float32", force: bool = False
    ) -> ForgeReport:
        """Synchronous wrapper around :meth:`arun` (not for use inside a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(d, ids, dtype=dtype, force=force))
        raise RuntimeError("TezzeretForge.run() called inside an event loop; await arun() instead")

    def _compile_and_save(
        self, bid: str, d: int, dtype: str
    ) -> tuple[leyline_pb2.KernelCatalogUpdate, float]:
        result = self.compiler.compile(bid, None, d=d, dtype=dtype)
        update = result.catalog_update
        record = self.library.save(
            self.catalog.get(bid),
            result.artifact_path,
            update,
            prewarm_samples=result.prewarm_samples_ms,
            compile_ms=result.compile_ms,
        )
        update.artifact_ref = record.artifact_ref
        self.log.append(
            {
                "event": "done",
                "blueprint_id": bid,
                "d": d,
                "dtype": dtype,
                "checksum": record.checksum,
                "ts": time.time(),
            }
        )
        return update, result.compile_ms

    def _notify(self, progress: ForgeProgress) -> None:
        if self.progress is not None:
            self.progress(progress)


async def run_forge(
    settings: Any,
    width: int,
    ids: Iterable[str] | None = None,
    on_update: CatalogUpdateCallback | None = None,
    progress: ProgressCallback | None = None,
    *,
    dtype: str = "float32",
    force: bool = False,
    registry: Any = None,
) -> ForgeReport:
    """Compile the catalogue (or ``ids``) for slot width ``width`` into the Urza library of ``settings``.

    ``settings`` is an ``EsperSettings`` (URZA_ARTIFACT_DIR, URZA_DATABASE_URL);
    ``on_update`` is awaited with each KernelCatalogUpdate (e.g. a bus publisher).
    """
    catalog = KarnCatalog()
    selected = ids_in(catalog, ids) if ids is not None else None
    library = await asyncio.to_thread(UrzaLibrary.from_settings, settings, registry=registry)
    try:
        forge = TezzeretForge(catalog, library, on_catalog_update=on_update, progress=progress)
        return await forge.arun(width, selected, dtype=dtype, force=force)
    finally:
        library.close()
