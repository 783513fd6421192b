from __future__ import annotations

import asyncio
import os
import pickle
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from esper.karn import SAFE, KarnCatalog
from esper.leyline import leyline_pb2
from esper.tezzeret import CompileResult, TezzeretCompiler
from esper.urza import (
    ArtifactNotFound,
    ChecksumMismatch,
    CorruptArtifact,
    GuardMismatch,
    InvalidArtifactRef,
    MissingArtifact,
    UrzaLibrary,
    UrzaRuntime,
    normalize_database_url,
    percentile,
)
from esper.urza.artifact import sha256_hex

CATALOG = KarnCatalog()


@pytest.fixture
def library(tmp_path: Path, database_url: str):
    lib = UrzaLibrary(tmp_path / "artifacts", database_url, registry=CollectorRegistry())
    yield lib
    lib.close()


def _compile(lib: UrzaLibrary, bid: str = "BP009", d: int = 32, params=None) -> CompileResult:
    return TezzeretCompiler(lib.root, catalog=CATALOG, prewarm_iterations=5).compile(bid, params, d=d)


def _save(lib: UrzaLibrary, bid: str = "BP009", d: int = 32, params=None):
    result = _compile(lib, bid, d, params)
    record = lib.save(
        CATALOG.get(bid),
        result.artifact_path,
        result.catalog_update,
        prewarm_samples=result.prewarm_samples_ms,
    )
    return result, record


def test_save_get_and_record_fields(library: UrzaLibrary) -> None:
    result, record = _save(library)
    assert record.checksum == result.checksum == sha256_hex(result.artifact_path.read_bytes())
    assert record.guard_digest == result.guard_digest
    assert record.artifact_path == f"BP009/{result.checksum[:16]}.safetensors"
    assert not Path(record.artifact_path).is_absolute()
    assert record.artifact_ref == f"urza://BP009/{result.checksum[:16]}"
    assert record.file_size == result.artifact_path.stat().st_size
    assert record.mtime_ns == result.artifact_path.stat().st_mtime_ns
    assert record.d == 32
    assert record.dtype == "float32"
    assert record.tier == SAFE
    assert record.compile_ms == pytest.approx(result.compile_ms)
    assert len(record.prewarm_samples) == 5
    assert record.descriptor == CATALOG.get("BP009")
    record.descriptor.name = "mutated"
    assert library.get("BP009").descriptor.name == "residual_block"
    assert library.get("BP404") is None


def test_resave_keeps_guard_and_samples_and_removes_superseded_file(library: UrzaLibrary) -> None:
    result, first = _save(library)
    again = library.save(CATALOG.get("BP009"), result.artifact_path)  # no update
    assert again.guard_digest == first.guard_digest
    assert again.prewarm_samples == first.prewarm_samples
    _, other = _save(library, params={"depth": 4})
    assert other.checksum != first.checksum
    assert not (library.root / first.artifact_path).exists()
    assert (library.root / other.artifact_path).exists()


def test_save_rejects_mismatching_update(library: UrzaLibrary) -> None:
    result = _compile(library)
    update = result.catalog_update
    update.checksum = "0" * 64
    with pytest.raises(ChecksumMismatch):
        library.save(CATALOG.get("BP009"), result.artifact_path, update)
    update = result.catalog_update
    update.guard_digest = "f" * 64
    with pytest.raises(GuardMismatch):
        library.save(CATALOG.get("BP009"), result.artifact_path, update)
    with pytest.raises(CorruptArtifact, match="holds BP009"):
        library.save(CATALOG.get("BP002"), result.artifact_path)
    assert library.list_all() == []


def test_save_copies_foreign_artifacts_into_the_library(tmp_path: Path, library: UrzaLibrary) -> None:
    result = TezzeretCompiler(tmp_path / "elsewhere").compile("BP002", d=8)
    record = library.save(CATALOG.get("BP002"), result.artifact_path, result.catalog_update)
    assert (library.root / record.artifact_path).read_bytes() == result.artifact_path.read_bytes()


def test_list_queries_read_the_database(tmp_path: Path, database_url: str) -> None:
    one = UrzaLibrary(tmp_path / "artifacts", database_url, cache_size=1)
    two = UrzaLibrary(tmp_path / "artifacts", database_url, cache_size=1)
    try:
        for bid in ("BP001", "BP002", "BP036"):
            _save(one, bid, d=8)
        _save(two, "BP005", d=8)  # a second instance on the same database
        assert [r.blueprint_id for r in one.list_all()] == ["BP001", "BP002", "BP005", "BP036"]
        assert [r.blueprint_id for r in one.list_by_tier(SAFE)] == ["BP001", "BP002", "BP005"]
        assert [r.blueprint_id for r in one.list_by_tier(leyline_pb2.BLUEPRINT_TIER_EXPERIMENTAL)] == [
            "BP036"
        ]
        assert one.load("BP005")(torch.randn(2, 8)).shape == (2, 8)
    finally:
        one.close()
        two.close()


def test_fetch_never_returns_the_same_instance(library: UrzaLibrary) -> None:
    _save(library)
    runtime = UrzaRuntime(library)
    a, latency_a = runtime.fetch_kernel("BP009")
    b, latency_b = runtime.fetch_kernel("BP009")
    assert a is not b
    assert all(pa is not pb for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    assert all(pa.data_ptr() != pb.data_ptr() for pa, pb in zip(a.parameters(), b.parameters(), strict=True))
    with torch.no_grad():
        next(a.parameters()).add_(1.0)  # training one seed never affects another
    c = runtime.load_kernel("BP009")
    assert torch.equal(next(c.parameters()), next(b.parameters()))
    x = torch.randn(4, 32, requires_grad=True)
    c(x).sum().backward()
    assert x.grad is not None
    snap = library.metrics_snapshot()
    assert snap["cache_hits"] >= 2
    assert latency_a > 0
    assert latency_b > 0
    with pytest.raises(KeyError):
        runtime.fetch_kernel("BP404")


def test_flipped_byte_is_caught(library: UrzaLibrary) -> None:
    _, record = _save(library)
    path = library.root / record.artifact_path
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    fresh = UrzaLibrary(library.root, library.database_url)  # empty kernel cache
    try:
        with pytest.raises(ChecksumMismatch) as info:
            fresh.load("BP009")
        assert info.value.reason == "checksum_mismatch"
        with pytest.raises(ChecksumMismatch):
            fresh.verify_artifact("BP009")
        assert fresh.metrics_snapshot()["errors_by_reason"]["checksum_mismatch"] == 2
    finally:
        fresh.close()


def test_truncated_artifact_is_caught(library: UrzaLibrary) -> None:
    _, record = _save(library)
    path = library.root / record.artifact_path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ChecksumMismatch):
        library.verify_artifact("BP009")


def test_vanished_file_and_missing_row(library: UrzaLibrary) -> None:
    with pytest.raises(MissingArtifact) as info:
        library.verify_artifact("BP009")
    assert info.value.reason == "missing_artifact"
    assert isinstance(info.value, KeyError)
    _, record = _save(library)
    (library.root / record.artifact_path).unlink()
    with pytest.raises(ArtifactNotFound) as nf:
        library.verify_artifact("BP009")
    assert nf.value.reason == "artifact_not_found"
    report = library.maintenance(grace_seconds=0)
    assert report.missing_files == [record.artifact_path]
    assert library.get("BP009") is not None  # never deletes rows


def test_hostile_pickle_is_rejected_without_unpickling(tmp_path: Path, library: UrzaLibrary) -> None:
    _, record = _save(library)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    path = library.root / record.artifact_path
    path.write_bytes(payload)
    # Even when an attacker also fixes the checksum in the catalogue, nothing is unpickled.
    with library._engine.begin() as conn:
        from esper.urza.catalog import kernels_table

        conn.execute(kernels_table.update().values(checksum=sha256_hex(payload)))
    fresh = UrzaLibrary(library.root, library.database_url)
    try:
        with pytest.raises(CorruptArtifact) as info:
            fresh.load("BP009")
        assert info.value.reason == "corrupt_artifact"
        with pytest.raises(CorruptArtifact):
            fresh.verify_artifact("BP009")
    finally:
        fresh.close()
    assert not marker.exists()


def test_manifest_shape_mismatch_is_corrupt(tmp_path: Path) -> None:
    from esper.tezzeret.kernels import build_kernel
    from esper.urza.modules import load_bytes, serialize

    module = build_kernel("BP009", {"depth": 2}, 16)
    blob, _ = serialize(
        module,
        blueprint_id="BP009",
        family="residual_mlp",
        family_args={"depth": 2},
        parameters={"depth": 2},
        d=32,
        dtype="float32",
    )  # lies about d
    with pytest.raises(CorruptArtifact, match="family expects"):
        load_bytes(blob)
    blob, _ = serialize(
        module,
        blueprint_id="BP009",
        family="residual_mlp",
        family_args={"depth": 3},
        parameters={"depth": 3},
        d=16,
        dtype="float32",
    )  # lies about depth
    with pytest.raises(CorruptArtifact, match="missing"):
        load_bytes(blob)


def test_interrupted_save_leaves_consistent_catalog(library: UrzaLibrary, monkeypatch) -> None:
    _, first = _save(library, params={"depth": 1})
    result = _compile(library, params={"depth": 3})

    def crash(conn, row):
        raise RuntimeError("power cut between file and row")

    monkeypatch.setattr(library, "_write_row", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        library.save(CATALOG.get("BP009"), result.artifact_path, result.catalog_update)
    monkeypatch.undo()
    record = library.get("BP009")
    assert record is not None
    assert record.checksum == first.checksum
    assert library.verify_artifact("BP009").checksum == first.checksum  # and its file
    orphan = library.root / f"BP009/{result.checksum[:16]}.safetensors"
    assert orphan.exists()
    (library.root / "BP009" / ".tmp-deadbeef-x.safetensors").write_bytes(b"partial")
    assert library.maintenance().kept_recent == 2  # inside the grace period: left alone
    report = library.maintenance(grace_seconds=0)
    assert report.removed_orphans == [f"BP009/{result.checksum[:16]}.safetensors"]
    assert len(report.removed_temp) == 1
    assert not orphan.exists()
    assert library.load("BP009") is not None


def test_startup_sweep_removes_old_orphans(tmp_path: Path, database_url: str) -> None:
    lib = UrzaLibrary(tmp_path / "a", database_url)
    result = _compile(lib)
    lib.close()
    old = time.time() - 3600
    os.utime(result.artifact_path, (old, old))
    lib = UrzaLibrary(tmp_path / "a", database_url)
    lib.close()
    assert not result.artifact_path.exists()


def test_verify_never_rehashes_unchanged_file(library: UrzaLibrary) -> None:
    _, record = _save(library)
    fresh = UrzaLibrary(library.root, library.database_url)
    try:
        info = fresh.verify_artifact("BP009")
        assert info.artifact_ref == record.artifact_ref
        assert info.checksum == record.checksum
        assert info.guard_digest == record.guard_digest
        assert info.prewarm_p50_ms == pytest.approx(percentile(record.prewarm_samples, 50))
        assert info.prewarm_p95_ms >= info.prewarm_p50_ms > 0
        hashes = fresh.metrics_snapshot()["hash_computations"]
        for _ in range(20):
            fresh.verify_artifact("BP009")
        assert fresh.metrics_snapshot()["hash_computations"] == hashes
        path = library.root / record.artifact_path
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touch
        fresh.verify_artifact("BP009")
        assert fresh.metrics_snapshot()["hash_computations"] == hashes + 1
        fresh.verify_artifact("BP009")
        assert fresh.metrics_snapshot()["hash_computations"] == hashes + 1
    finally:
        fresh.close()


def test_save_primes_verification(library: UrzaLibrary) -> None:
    _save(library)
    hashes = library.metrics_snapshot()["hash_computations"]
    library.verify_artifact("BP009")
    assert library.metrics_snapshot()["hash_computations"] == hashes


def test_load_verified_by_ref(library: UrzaLibrary) -> None:
    _, record = _save(library)
    other = UrzaLibrary(library.root, f"sqlite:///{library.root.parent / 'unrelated.db'}")
    try:  # a consumer needs only the shared artifact dir, not the catalogue row
        module = other.load_verified(record.artifact_ref, record.checksum, record.guard_digest)
        assert module(torch.randn(2, 32)).shape == (2, 32)
        assert other.load_verified(record.artifact_path, record.checksum, record.guard_digest) is not module
        with pytest.raises(GuardMismatch):
            other.load_verified(record.artifact_ref, record.checksum, "0" * 64)
        with pytest.raises(ChecksumMismatch):
            UrzaLibrary(library.root, other.database_url).load_verified(
                record.artifact_ref, "1" * 64, record.guard_digest
            )
        for bad in ("/etc/passwd", "../x.safetensors", "urza://BP009/../../x", "urza://BP009"):
            with pytest.raises(InvalidArtifactRef):
                other.load_verified(bad, record.checksum, record.guard_digest)
        with pytest.raises(ChecksumMismatch, match="does not name"):
            other.load_verified("urza://BP009/0123456789abcdef", record.checksum, record.guard_digest)
        with pytest.raises(ArtifactNotFound):
            other.load_verified(
                "urza://BP009/0123456789abcdef", "0123456789abcdef" + "0" * 48, record.guard_digest
            )
    finally:
        other.close()


def test_metrics_and_prometheus(library: UrzaLibrary) -> None:
    _save(library)
    library.load("BP009")
    library.load("BP009")
    with pytest.raises(MissingArtifact):
        library.load("BP404")
    snap = library.metrics_snapshot()
    assert snap["cache_hits"] >= 1
    assert snap["errors_by_reason"] == {"missing_artifact": 1}
    assert snap["lookup_latency_ms"] > 0
    reg = library.registry
    assert reg.get_sample_value("urza_errors_total", {"reason": "missing_artifact"}) == 1
    assert reg.get_sample_value("urza_lookup_latency_seconds_count", {"operation": "load"}) == 3
    assert reg.get_sample_value("urza_kernel_cache_hits_total") == snap["cache_hits"]


def test_ttl_only_evicts_memory(tmp_path: Path, database_url: str) -> None:
    lib = UrzaLibrary(tmp_path / "a", database_url, cache_ttl_seconds=0.01)
    try:
        _, record = _save(lib)
        lib.load("BP009")
        time.sleep(0.03)
        lib.load("BP009")
        assert lib.metrics_snapshot()["cache_expired"] == 1
        assert (lib.root / record.artifact_path).exists()
        assert lib.get("BP009") is not None
    finally:
        lib.close()


async def test_async_wrappers(library: UrzaLibrary) -> None:
    result = _compile(library)
    record = await library.asave(CATALOG.get("BP009"), result.artifact_path, result.catalog_update)
    runtime = UrzaRuntime(library)
    (a, _), (b, _) = await asyncio.gather(runtime.afetch_kernel("BP009"), runtime.afetch_kernel("BP009"))
    assert a is not b
    assert [r.blueprint_id for r in await library.alist_all()] == ["BP009"]
    assert len(await library.alist_by_tier(SAFE)) == 1
    info = await library.averify_artifact("BP009")
    module = await library.aload_verified(info.artifact_ref, info.checksum, info.guard_digest)
    assert module(torch.randn(1, 32)).shape == (1, 32)
    assert (await library.aget("BP009")).checksum == record.checksum
    assert (await library.amaintenance(grace_seconds=0)).removed_orphans == []


def test_sqlite_wal_and_url_handling(tmp_path: Path) -> None:
    lib = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'nested' / 'dir' / 'c.db'}")
    try:
        with lib._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    finally:
        lib.close()
    default = UrzaLibrary(tmp_path / "b")
    assert default.database_url == f"sqlite:///{(tmp_path / 'b').resolve() / 'catalog.db'}"
    default.close()
    assert normalize_database_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_additive_migration(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE urza_kernels (blueprint_id VARCHAR(64) PRIMARY KEY, name VARCHAR(128) NOT NULL,"
        " tier VARCHAR(40) NOT NULL, descriptor_json TEXT NOT NULL, artifact_path VARCHAR(255) NOT NULL)"
    )
    conn.commit()
    conn.close()
    lib = UrzaLibrary(tmp_path / "a", f"sqlite:///{db}")
    try:
        _save(lib, "BP001", d=4)
        assert lib.get("BP001").checksum
    finally:
        lib.close()


@pytest.mark.slow
def test_load_latency_small_residual_mlp(library: UrzaLibrary) -> None:
    """A d=32 residual MLP loads from its artifact in about a millisecond (budget 10 ms)."""
    _, record = _save(library, params={"depth": 2})
    cold: list[float] = []
    for _ in range(30):
        fresh = UrzaLibrary(library.root, library.database_url, sweep_grace_seconds=None)
        started = time.perf_counter()
        fresh.load_verified(record.artifact_ref, record.checksum, record.guard_digest)
        cold.append((time.perf_counter() - started) * 1000)
        fresh.close()
    runtime = UrzaRuntime(library)
    warm = sorted(runtime.fetch_kernel("BP009")[1] for _ in range(50))
    cold.sort()
    print(f"cold load_verified p50 {cold[15]:.2f} ms; fetch_kernel (row + cache) p50 {warm[25]:.2f} ms")
    assert cold[15] < 10.0
    assert warm[25] < 10.0


def test_storage_errors_are_raised_and_counted(tmp_path: Path) -> None:
    from sqlalchemy.exc import SQLAlchemyError

    lib = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'c.db'}")
    with lib._engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE urza_kernels")
    with pytest.raises(SQLAlchemyError):
        lib.verify_artifact("BP001")  # a broken catalogue is not reported as a missing artifact
    assert lib.metrics_snapshot()["errors_by_reason"] == {"database_error": 1}
    lib.close()
