from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.core.settings import EsperSettings
from esper.karn import KarnCatalog, UnknownBlueprintError
from esper.leyline import leyline_pb2
from esper.tezzeret import ForgeProgress, TezzeretCompiler, TezzeretForge, run_forge
from esper.tezzeret.cli import main
from esper.urza import UrzaLibrary

IDS = ["BP001", "BP002", "BP003", "BP009", "BP021", "BP022"]


class Boom(RuntimeError):
    pass


class CrashingCompiler(TezzeretCompiler):
    """Raises after ``crash_after`` successful compiles (simulated crash)."""

    def __init__(self, *args, crash_after: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_after = crash_after
        self.compiled: list[str] = []

    def compile(self, blueprint_id, parameters=None, *, d, dtype="float32"):
        if self.crash_after is not None and len(self.compiled) >= self.crash_after:
            raise Boom(f"crash before {blueprint_id}")
        result = super().compile(blueprint_id, parameters, d=d, dtype=dtype)
        self.compiled.append(blueprint_id)
        return result


def _forge(tmp_path: Path, database_url: str, **kw):
    catalog = KarnCatalog()
    library = UrzaLibrary(tmp_path / "artifacts", database_url)
    compiler = CrashingCompiler(
        library.root, catalog=catalog, prewarm_iterations=2, crash_after=kw.pop("crash_after", None)
    )
    return TezzeretForge(catalog, library, compiler, **kw), library, compiler


async def test_forge_crash_and_resume(tmp_path: Path, database_url: str) -> None:
    updates: list[leyline_pb2.KernelCatalogUpdate] = []
    progress: list[ForgeProgress] = []

    async def on_update(update: leyline_pb2.KernelCatalogUpdate) -> None:
        updates.append(update)

    forge, library, compiler = _forge(
        tmp_path, database_url, crash_after=3, on_catalog_update=on_update, progress=progress.append
    )
    with pytest.raises(Boom):
        await forge.arun(16, IDS)
    assert compiler.compiled == IDS[:3]
    assert [r.blueprint_id for r in library.list_all()] == IDS[:3]
    assert [u.blueprint_id for u in updates] == IDS[:3]
    library.close()

    forge2, library2, compiler2 = _forge(tmp_path, database_url, progress=progress.append)
    report = await forge2.arun(16, IDS)
    assert compiler2.compiled == IDS[3:]  # finished kernels are not recompiled
    assert report.skipped == IDS[:3]
    assert report.compiled == IDS[3:]
    assert [r.blueprint_id for r in library2.list_all()] == IDS
    assert progress[-1].index == progress[-1].total == len(IDS)
    assert {p.status for p in progress} == {"compiled", "skipped"}

    # Another width is a different job; the same width again is a no-op.
    again = await forge2.arun(16, IDS)
    assert again.compiled == []
    assert again.skipped == IDS
    forced = await forge2.arun(16, IDS[:1], force=True)
    assert forced.compiled == IDS[:1]
    library2.close()


async def test_torn_log_line_is_ignored_and_missing_row_recompiles(tmp_path: Path, database_url: str) -> None:
    forge, library, _compiler = _forge(tmp_path, database_url)
    await forge.arun(8, ["BP001", "BP002"])
    with forge.log.path.open("a") as fh:
        fh.write('{"event": "done", "blueprint_id": "BP0')  # crash mid-append
    library.delete("BP002")
    assert forge.pending(8, ["BP001", "BP002"]) == ["BP002"]
    report = await forge.arun(8, ["BP001", "BP002"])
    assert report.compiled == ["BP002"]
    lines = forge.log.path.read_text().splitlines()
    assert json.loads(lines[-1])["blueprint_id"] == "BP002"
    library.close()


async def test_publish_failure_is_reported_not_fatal(tmp_path: Path, database_url: str) -> None:
    async def failing(update: leyline_pb2.KernelCatalogUpdate) -> None:
        raise ConnectionError("bus down")

    forge, library, _ = _forge(tmp_path, database_url, on_catalog_update=failing)
    report = await forge.arun(8, ["BP001"])
    assert report.compiled == ["BP001"]
    assert report.publish_failures == ["BP001"]
    assert library.get("BP001") is not None
    library.close()


async def test_run_forge_with_settings(tmp_path: Path) -> None:
    settings = EsperSettings(
        urza_artifact_dir=tmp_path / "a", urza_database_url=f"sqlite:///{tmp_path / 'c.db'}"
    )
    seen: list[str] = []

    async def on_update(update: leyline_pb2.KernelCatalogUpdate) -> None:
        seen.append(update.artifact_ref)

    report = await run_forge(settings, 8, ["BP009"], on_update=on_update)
    assert report.compiled == ["BP009"]
    assert seen[0].startswith("urza://BP009/")
    with pytest.raises(UnknownBlueprintError):
        await run_forge(settings, 8, ["BP000"])


@pytest.mark.slow
def test_forge_whole_catalogue(tmp_path: Path) -> None:
    catalog = KarnCatalog()
    library = UrzaLibrary(tmp_path / "a", f"sqlite:///{tmp_path / 'c.db'}")
    forge = TezzeretForge(
        catalog, library, TezzeretCompiler(library.root, catalog=catalog, prewarm_iterations=2)
    )
    report = forge.run(24)
    assert len(report.compiled) == 50
    assert len(library.list_all()) == 50
    for record in library.list_all():
        assert record.d == 24
        assert record.checksum
        assert record.prewarm_samples
    library.close()


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], isolated_env: Path) -> None:
    args = [
        "--width",
        "8",
        "--artifact-dir",
        str(tmp_path / "a"),
        "--database-url",
        f"sqlite:///{tmp_path / 'c.db'}",
    ]
    assert main([*args, "--blueprints", "BP001,bp002"]) == 0
    err = capsys.readouterr().err
    assert "2/2" in err
    assert "2 compiled" in err
    assert main([*args, "--blueprints", "BP001,BP002", "--quiet"]) == 0
    assert "0 compiled, 2 already done" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([*args, "--blueprints", "BP001,BP999"])
    assert info.value.code == 2
    assert "BP999" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--width", "-3"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["--width", "8", "--dtype", "int4"])
    assert info.value.code == 2
    assert main(["--width", "8", "--database-url", "mysql://x"]) == 2
    assert "URZA_DATABASE_URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--width",
        "--blueprints",
        "--dtype",
        "--artifact-dir",
        "--database-url",
        "--force",
        "--publish",
    ):
        assert flag in out
