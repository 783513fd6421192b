"""The artifact-directory sweep: orphan files, stale temp files, rows without a file.

``save`` writes the file before its row, so a crash in between leaves an
orphan file (never a row without its file), and a crash inside an atomic
write leaves a temp file. Both are removed once older than a grace period,
which spares a concurrent ``save`` between its file and its row the work of
writing the file again. Rows whose file vanished are only *reported*:
deleting them would hide the loss.

The artifact dir may be shared by replicas (one file system mounted by
several hosts), so a file is only ever removed by :func:`remove_if_unreferenced`:
it re-checks, under the blueprint's lock (:func:`esper.urza.catalog.locked_transaction`),
that no row names the file, and ``save`` takes the same lock to check that
its file still exists before it commits the row naming it. Whichever comes
first, no committed row ever points at a removed file.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, select

from esper.urza import artifact as fmt
from esper.urza.catalog import artifact_lock_key, kernels_table, locked_transaction
from esper.urza.errors import UrzaError
from esper.urza.records import MaintenanceReport


def _is_stale(path: Path, now: float, grace_seconds: float) -> bool | None:
    """Whether ``path`` is older than the grace period; None once it is gone."""
    try:
        return now - path.stat().st_mtime >= grace_seconds
    except FileNotFoundError:
        return None


def remove_if_unreferenced(
    root: Path, engine: Engine, rel: str, *, now: float | None = None, grace_seconds: float = 0.0
) -> bool | None:
    """Unlink the artifact ``rel`` unless a row names it or it is younger than the grace period.

    True if removed, False if kept for its age, None if a row names it or it
    is gone already. Runs under the blueprint's lock, so a ``save`` that is
    about to commit a row naming the file either sees it gone (and writes it
    again) or has committed (and the file stays).
    """
    path = root / fmt.ref_to_relative(rel)
    with locked_transaction(engine, artifact_lock_key(rel.split("/", 1)[0])) as conn:
        named = conn.execute(
            select(kernels_table.c.blueprint_id).where(kernels_table.c.artifact_path == rel)
        ).first()
        if named is not None:
            return None
        stale = _is_stale(path, time.time() if now is None else now, grace_seconds)
        if not stale:
            return None if stale is None else False
        path.unlink(missing_ok=True)
        return True


def sweep(root: Path, engine: Engine, grace_seconds: float) -> MaintenanceReport:
    """Remove orphans and stale temp files under ``root``; report rows whose file is missing.

    Files are listed before rows are read, so an artifact whose row is
    committed meanwhile is never mistaken for an orphan; each candidate is
    checked again under its lock before it is removed.
    """
    report = MaintenanceReport()
    now = time.time()
    files: list[tuple[str, Path]] = []
    temps: list[Path] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sub.iterdir():
            if entry.name.startswith(fmt.TEMP_PREFIX):
                temps.append(entry)
            elif entry.name.endswith(fmt.SUFFIX) and entry.is_file():
                files.append((f"{sub.name}/{entry.name}", entry))
    with engine.connect() as conn:
        referenced = set(conn.execute(select(kernels_table.c.artifact_path)).scalars())
    for rel, path in files:
        if rel in referenced:
            continue
        stale = _is_stale(path, now, grace_seconds)
        if stale is False:
            report.kept_recent += 1
        elif stale:
            removed = remove_if_unreferenced(root, engine, rel, now=now, grace_seconds=grace_seconds)
            if removed:
                report.removed_orphans.append(rel)
            elif removed is False:
                report.kept_recent += 1
    for path in temps:
        stale = _is_stale(path, now, grace_seconds)
        if stale is False:
            report.kept_recent += 1
        elif stale:
            path.unlink(missing_ok=True)  # untouched for the grace period: its writer crashed
            report.removed_temp.append(f"{path.parent.name}/{path.name}")
    for rel in sorted(referenced):
        try:
            if not (root / fmt.ref_to_relative(rel)).is_file():
                report.missing_files.append(rel)
        except UrzaError:
            report.missing_files.append(rel)
    return report
