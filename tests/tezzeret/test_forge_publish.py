"""``esper-forge --publish`` announces each kernel as a signed catalog update on the bus."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from esper.leyline import leyline_pb2 as pb
from esper.security import KeyRing
from esper.tezzeret.cli import main

SECRET = "forge-publish-secret-0123456789"


def test_publish_sends_signed_catalog_updates(
    tmp_path: Path, isolated_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    args = [
        "--width",
        "8",
        "--artifact-dir",
        str(tmp_path / "a"),
        "--database-url",
        f"sqlite:///{tmp_path}/c.db",
    ]
    assert main([*args, "--blueprints", "BP001,BP002", "--publish", "--quiet"]) == 0
    client = redis.Redis.from_url(redis_url)
    entries = client.xrange("oona.kernels.ready")
    client.close()
    ring = KeyRing(SECRET.encode())
    updates = []
    for _id, fields in entries:
        assert ring.verify(fields[b"payload"], fields[b"signature"], fields[b"kid"].decode())
        envelope = pb.BusEnvelope.FromString(fields[b"payload"])
        assert envelope.message_type == pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE
        updates.append(pb.KernelCatalogUpdate.FromString(envelope.payload))
    assert sorted(u.blueprint_id for u in updates) == ["BP001", "BP002"]
    assert all(u.artifact_ref.startswith("urza://") and len(u.checksum) == 64 for u in updates)


def test_publish_without_a_bus_is_a_clear_error(
    tmp_path: Path, isolated_env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET)
    assert main(["--width", "8", "--artifact-dir", str(tmp_path), "--blueprints", "BP001", "--publish"]) == 2
    err = capsys.readouterr().err
    assert "REDIS_URL" in err
    assert SECRET not in err
