"""The artifact-directory sweep: orphan files, stale temp files, rows without a file.

``save`` writes the file before its row, so a crash in between leaves an
orphan file (never a row without its file), and a crash inside an atomic
write leaves a temp file. Both are removed once older than a grace period,
which protects a concurrent ``save`` between its file and its row. Rows whose
file vanished are only *reported*: deleting them would hide the loss.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import Engine, select

from esper.urza import artifact as fmt
from esper.urza.catalog import kernels_table
from esper.urza.errors import UrzaError
from esper.urza.records import MaintenanceReport


def _remove_if_stale(path: Path, now: float, grace_seconds: float, report: MaintenanceReport) -> bool:
    """Unlink ``path`` if older than the grace period; False if kept or already gone."""
    try:
        if now - path.stat().st_mtime < grace_seconds:
            report.kept_recent += 1
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def sweep(root: Path, engine: Engine, grace_seconds: float) -> MaintenanceReport:
    """Remove orphans and stale temp files under ``root``; report rows whose file is missing.

    Files are listed before rows are read, so an artifact whose row is
    committed meanwhile is never mistaken for an orphan.
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
        if rel not in referenced and _remove_if_stale(path, now, grace_seconds, report):
            report.removed_orphans.append(rel)
    for path in temps:
        if _remove_if_stale(path, now, grace_seconds, report):
            report.removed_temp.append(f"{path.parent.name}/{path.name}")
    for rel in sorted(referenced):
        try:
            if not (root / fmt.ref_to_relative(rel)).is_file():
                report.missing_files.append(rel)
        except UrzaError:
            report.missing_files.append(rel)
    return report
