"""Replicas sharing one artifact dir (and one catalogue) never rewrite or lose each other's files.

Two libraries open the same artifact dir and database, as two replicas on
shared storage do. A peer that saves a kernel already on disk leaves the
file alone; a peer's sweep or superseding save that lands between another
library's file and its row costs a rewrite, never a row without its file.
The interleavings are forced through ``_store_file``, the step between the
file and the row, where the peer's maintenance runs for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from esper.karn import KarnCatalog
from esper.tezzeret import CompileResult, TezzeretCompiler
from esper.urza import UrzaLibrary
from esper.urza.maintenance import remove_if_unreferenced

CATALOG = KarnCatalog()

_PEER_SAVE = textwrap.dedent(
    """
    import json, sys
    from esper.karn import KarnCatalog
    from esper.urza import UrzaLibrary
    shared, url, source = sys.argv[1:4]
    library = UrzaLibrary(shared, url, sweep_grace_seconds=0)  # its start-up sweep spares nothing young
    record = library.save(KarnCatalog().get("BP009"), source)
    library.close()
    print(json.dumps({"artifact_path": record.artifact_path, "checksum": record.checksum}))
    """
)


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    return tmp_path / "shared-artifacts"


@pytest.fixture
def replica_a(shared: Path, database_url: str) -> Iterator[UrzaLibrary]:
    lib = UrzaLibrary(shared, database_url, registry=CollectorRegistry())
    yield lib
    lib.close()


@pytest.fixture
def replica_b(shared: Path, database_url: str) -> Iterator[UrzaLibrary]:
    lib = UrzaLibrary(shared, database_url, registry=CollectorRegistry())
    yield lib
    lib.close()


def _forge(out: Path, depth: int) -> CompileResult:
    """Compile BP009 outside the shared dir, as a forge on another host would."""
    compiler = TezzeretCompiler(out, catalog=CATALOG, prewarm_iterations=2)
    return compiler.compile("BP009", {"depth": depth}, d=8)


def test_a_peer_process_saving_the_same_kernel_leaves_the_file_alone(
    tmp_path: Path, replica_a: UrzaLibrary
) -> None:
    result = _forge(tmp_path / "forge", depth=2)
    record = replica_a.save(CATALOG.get("BP009"), result.artifact_path, result.catalog_update)
    path = replica_a.root / record.artifact_path
    before = path.stat()
    replica_a.verify_artifact("BP009")
    hashes = replica_a.metrics_snapshot()["hash_computations"]

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _PEER_SAVE,
            str(replica_a.root),
            replica_a.database_url,
            str(result.artifact_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    peer = json.loads(out.stdout.strip().splitlines()[-1])

    assert peer == {"artifact_path": record.artifact_path, "checksum": record.checksum}
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left either
    replica_a.verify_artifact("BP009")  # unchanged file: known, not hashed again
    assert replica_a.metrics_snapshot()["hash_computations"] == hashes


def test_a_peer_sweep_between_file_and_row_costs_a_rewrite_not_the_file(
    tmp_path: Path, replica_a: UrzaLibrary, replica_b: UrzaLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reuses an old orphan of the same bytes; A's sweep removes it before B's row exists."""
    result = _forge(tmp_path / "forge", depth=2)
    orphan = replica_b.root / f"BP009/{result.checksum[:16]}.safetensors"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(result.artifact_path.read_bytes())
    old = time.time() - 3600  # left by a crash an hour ago: past any grace period
    os.utime(orphan, (old, old))

    sweeps = []
    store = replica_b._store_file

    def store_then_peer_sweeps(dest: Path, blob: bytes, checksum: str) -> None:
        store(dest, blob, checksum)
        assert dest.stat().st_mtime == old  # the orphan was reused, not rewritten
        sweeps.append(replica_a.maintenance())

    monkeypatch.setattr(replica_b, "_store_file", store_then_peer_sweeps)
    record = replica_b.save(CATALOG.get("BP009"), result.artifact_path, result.catalog_update)

    assert sweeps[0].removed_orphans == [record.artifact_path]  # the interleaving did happen
    assert orphan.is_file()
    assert replica_a.verify_artifact("BP009").checksum == result.checksum
    assert replica_a.maintenance(grace_seconds=0).missing_files == []


def test_a_peer_superseding_save_between_file_and_row_keeps_the_file_the_row_names(
    tmp_path: Path, replica_a: UrzaLibrary, replica_b: UrzaLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B re-saves kernel X while A supersedes X with Y and removes X's file; B's row wins and has X."""
    x = _forge(tmp_path / "forge-x", depth=1)
    y = _forge(tmp_path / "forge-y", depth=3)
    replica_a.save(CATALOG.get("BP009"), x.artifact_path, x.catalog_update)

    store = replica_b._store_file

    def store_then_peer_supersedes(dest: Path, blob: bytes, checksum: str) -> None:
        store(dest, blob, checksum)
        replica_a.save(CATALOG.get("BP009"), y.artifact_path, y.catalog_update)
        assert not dest.exists()  # A removed X: no row named it any more

    monkeypatch.setattr(replica_b, "_store_file", store_then_peer_supersedes)
    record = replica_b.save(CATALOG.get("BP009"), x.artifact_path, x.catalog_update)

    assert record.checksum == x.checksum
    assert replica_a.verify_artifact("BP009").checksum == x.checksum
    assert replica_a.load("BP009") is not None
    files = sorted(p.name for p in (replica_a.root / "BP009").iterdir())
    assert files == [f"{x.checksum[:16]}.safetensors"]  # Y, superseded by B's row, was removed by B


def test_sweep_spares_a_file_a_peer_has_just_written(
    tmp_path: Path, replica_a: UrzaLibrary, replica_b: UrzaLibrary
) -> None:
    """A fresh uncatalogued file (a peer between its file and its row) is inside the grace period."""
    result = _forge(replica_b.root, depth=2)  # written in place, no row yet
    report = replica_a.maintenance()
    assert report.removed_orphans == []
    assert report.kept_recent == 1
    assert result.artifact_path.is_file()


def test_removal_rechecks_the_catalogue_under_the_lock(replica_a: UrzaLibrary, tmp_path: Path) -> None:
    """A sweep that listed a file as an orphan before a peer's row committed keeps it."""
    result = _forge(tmp_path / "forge", depth=2)
    record = replica_a.save(CATALOG.get("BP009"), result.artifact_path, result.catalog_update)
    engine = replica_a._engine
    assert remove_if_unreferenced(replica_a.root, engine, record.artifact_path, grace_seconds=0) is None
    assert (replica_a.root / record.artifact_path).is_file()
    assert replica_a.delete("BP009")
    assert not (replica_a.root / record.artifact_path).exists()
