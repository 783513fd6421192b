"""Urza verifies artifacts without torch, and still catches every forgery the checksum lets through.

Artifacts are compiled by the real Tezzeret compiler (torch) in this process;
verification runs in a fresh interpreter that must never import torch.
Forgeries rewrite the artifact *and* its catalogued checksum, so only the
content checks stand between them and a KernelArtifactReady.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load, save

from esper.karn import KarnCatalog
from esper.tezzeret import TezzeretCompiler
from esper.urza import CorruptArtifact, GuardMismatch, UrzaLibrary
from esper.urza.artifact import data_section, sha256_hex
from esper.urza.catalog import kernels_table

CATALOG = KarnCatalog()

_VERIFY = textwrap.dedent(
    """
    import asyncio, json, sys
    from esper.urza import UrzaError, UrzaLibrary
    library = UrzaLibrary(sys.argv[1], sys.argv[2])
    results = {}
    for bid in sys.argv[3:]:
        try:
            info = asyncio.run(library.averify_artifact(bid))
            results[bid] = ["ok", info.checksum, info.guard_digest]
        except UrzaError as exc:
            results[bid] = [exc.reason, str(exc), ""]
    report = library.maintenance(grace_seconds=0)
    library.close()
    print(json.dumps({"results": results, "missing": report.missing_files,
                      "torch": "torch" in sys.modules}))
    """
)


@pytest.fixture
def library(tmp_path: Path) -> UrzaLibrary:
    lib = UrzaLibrary(tmp_path / "artifacts", f"sqlite:///{tmp_path / 'catalog.db'}")
    compiler = TezzeretCompiler(lib.root, catalog=CATALOG, prewarm_iterations=2)
    for bid in ("BP002", "BP009", "BP012"):
        result = compiler.compile(bid, None, d=8)
        lib.save(CATALOG.get(bid), result.artifact_path, result.catalog_update)
    return lib


def _verify_elsewhere(library: UrzaLibrary, *bids: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _VERIFY, str(library.root), library.database_url, *bids],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, object] = json.loads(out.splitlines()[-1])
    return result


def _forge(library: UrzaLibrary, bid: str, blob: bytes) -> None:
    """Replace the artifact and make the catalogue vouch for the new bytes."""
    record = library.get(bid)
    assert record is not None
    (library.root / record.artifact_path).write_bytes(blob)
    with library._engine.begin() as conn:
        row = kernels_table.c.blueprint_id == bid
        conn.execute(kernels_table.update().where(row).values(checksum=sha256_hex(blob)))


def _parts(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    return load(blob), json.loads(header["__metadata__"]["esper_manifest"])


def _repack(tensors: dict[str, np.ndarray], manifest: dict[str, object]) -> bytes:
    manifest = {**manifest, "tensors_sha256": sha256_hex(data_section(save(tensors)))}
    return save(tensors, metadata={"esper_manifest": json.dumps(manifest)})


def test_good_artifacts_verify_in_a_process_without_torch(library: UrzaLibrary) -> None:
    report = _verify_elsewhere(library, "BP002", "BP009", "BP012", "BP404")
    assert report["torch"] is False
    results = report["results"]
    assert isinstance(results, dict)
    for bid in ("BP002", "BP009", "BP012"):
        record = library.get(bid)
        assert record is not None
        assert results[bid] == ["ok", record.checksum, record.guard_digest]
    assert results["BP404"][0] == "missing_artifact"
    assert report["missing"] == []


def test_forgeries_with_a_matching_checksum_are_refused_without_torch(library: UrzaLibrary) -> None:
    def artifact(bid: str) -> bytes:
        record = library.get(bid)
        assert record is not None
        return (library.root / record.artifact_path).read_bytes()

    # 1. A tensor in another dtype than the manifest says (the data hash recomputed to match).
    tensors, manifest = _parts(artifact("BP012"))
    _forge(library, "BP012", _repack({k: v.astype(np.float64) for k, v in tensors.items()}, manifest))
    # 2. Tensor bytes changed under an unchanged manifest.
    blob = bytearray(artifact("BP002"))
    blob[-1] ^= 0x40
    _forge(library, "BP002", bytes(blob))
    # 3. Two same-shaped tensors declared over the same bytes (overlap, and a gap left behind).
    good = artifact("BP009")
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    first, second = [k for k in sorted(header) if k.startswith("blocks.0.norm.")]  # bias, weight: (d,)
    header[second]["data_offsets"] = header[first]["data_offsets"]
    raw = json.dumps(header).encode()
    _forge(library, "BP009", struct.pack("<Q", len(raw)) + raw + good[8 + n :])

    report = _verify_elsewhere(library, "BP009", "BP002", "BP012")
    assert report["torch"] is False
    results = report["results"]
    assert isinstance(results, dict)
    assert results["BP012"][0] == "corrupt_artifact"
    assert "are not float32" in results["BP012"][1]
    assert results["BP002"][0] == "corrupt_artifact"
    assert "tensor data does not match" in results["BP002"][1]
    assert results["BP009"][0] == "corrupt_artifact"
    assert "overlap or leave a gap" in results["BP009"][1]


def test_guard_and_family_fit(library: UrzaLibrary, tmp_path: Path) -> None:
    """The guard is checked by verification; whether tensors fit the family only by a load (torch)."""
    record = library.get("BP009")
    assert record is not None
    with library._engine.begin() as conn:
        conn.execute(kernels_table.update().values(guard_digest="0" * 64))
    fresh = UrzaLibrary(library.root, library.database_url)
    with pytest.raises(GuardMismatch):
        fresh.verify_artifact("BP009")
    fresh.close()

    path = library.root / record.artifact_path
    tensors, manifest = _parts(path.read_bytes())
    name = sorted(tensors)[0]
    renamed = {("renamed." + k if k == name else k): v for k, v in tensors.items()}
    _forge(library, "BP009", _repack(renamed, manifest))
    with library._engine.begin() as conn:
        conn.execute(kernels_table.update().values(guard_digest=record.guard_digest))
    fresh = UrzaLibrary(library.root, library.database_url)
    try:
        fresh.verify_artifact("BP009")  # the layout is sound and the hashes match ...
        with pytest.raises(CorruptArtifact, match="do not fit family"):
            fresh.load("BP009")  # ... but a trainer's load refuses it
    finally:
        fresh.close()
