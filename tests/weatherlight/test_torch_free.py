"""The control plane never imports torch: not at import time, not at boot, not while it works.

Kernels are forged here (torch, like ``esper-forge``); the control plane runs
in a fresh interpreter that imports what ``esper-weatherlight-service``
imports, boots the service against the session's real Redis-protocol server
and drives every component through the bus - a system state that Tamiyo
answers with a signed GERMINATE (which the Kasmina warmer then verifies), a
prefetch request the Urza worker answers, a policy update Tamiyo applies -
before it reports ``sys.modules``. Each torch-free entry point is also
imported on its own in a fresh interpreter, and a torch-backed name is
imported as a control that the check can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from esper.karn import KarnCatalog
from esper.tamiyo import DEFAULT_BLUEPRINT_CANDIDATES
from esper.tezzeret import TezzeretCompiler
from esper.urza import UrzaLibrary

SECRET = "torch-free-test-secret-0123456789abcdef"

_BOOT_AND_DRIVE = textwrap.dedent(
    """
    import asyncio, json, sys
    import esper.weatherlight.cli  # what the console script imports
    from esper.core.settings import load_settings
    from esper.leyline import leyline_pb2 as L
    from esper.oona import OonaClient, StreamConfig
    from esper.security import KeyRing
    from esper.tamiyo import PolicyConfig, TamiyoPolicy, encode_policy
    from esper.weatherlight.service import WeatherlightService

    async def until(redis, stream, wanted, predicate=lambda m: True):
        last = "0-0"
        async with asyncio.timeout(30):
            while True:
                for _s, entries in await redis.xread({stream: last}, block=500) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        envelope = L.BusEnvelope.FromString(fields[b"payload"])
                        if envelope.message_type == wanted:
                            message = {
                                L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: L.AdaptationCommand,
                                L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: L.KernelArtifactReady,
                                L.BUS_MESSAGE_TYPE_TELEMETRY: L.TelemetryPacket,
                            }[wanted].FromString(envelope.payload)
                            if predicate(message):
                                return message

    def has_event(name):
        return lambda packet: any(e.description == name for e in packet.events)

    async def main():
        settings = load_settings()
        service = WeatherlightService(settings)
        await service.start()
        booted = "torch" in sys.modules
        keyring = KeyRing(*settings.signing_secrets())
        config = StreamConfig(instance="trainer-1")
        trainer = OonaClient(settings.redis_url, config, keyring, name="trainer")
        try:
            state = L.SystemStatePacket(version=1, current_epoch=1, validation_loss=0.9,
                                        validation_accuracy=0.4, training_loss=0.8,
                                        training_run_id="torch-free", packet_id="torch-free-1")
            state.timestamp_ns = 1
            assert (await trainer.publish_state(state)).ok
            command = await until(trainer.redis, "oona.normal", L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND)
            blueprint = command.seed_operation.blueprint_id
            warmed = await until(trainer.redis, "oona.telemetry", L.BUS_MESSAGE_TYPE_TELEMETRY,
                                 has_event("kernel_warmed"))
            request = L.KernelPrefetchRequest(request_id="r-1", blueprint_id=blueprint,
                                              training_run_id="torch-free")
            request.issued_at.GetCurrentTime()
            assert (await trainer.publish_kernel_prefetch_request(request)).ok
            ready = await until(trainer.redis, "oona.kernels.ready", L.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY)
            payload = encode_policy(TamiyoPolicy(PolicyConfig(seed=1)), 1, "torch-free")
            update = L.PolicyUpdate(version=1, tamiyo_policy_version="1", policy_id="torch-free",
                                    payload=payload)
            update.issued_at.GetCurrentTime()
            assert (await trainer.publish_policy_update(update)).ok
            await until(trainer.redis, "oona.telemetry", L.BUS_MESSAGE_TYPE_TELEMETRY,
                        has_event("policy_update_accepted"))
            report = {
                "torch_after_boot": booted,
                "torch": "torch" in sys.modules,
                "torch_modules": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")),
                "command": L.CommandType.Name(command.command_type),
                "blueprint": blueprint,
                "warmed": [dict(e.attributes) for e in warmed.events],
                "ready": [ready.blueprint_id, ready.checksum],
                "policy_version": service.tamiyo.controller.policy_version,
            }
        finally:
            await trainer.aclose()
            result = await service.stop()
        report["clean"] = result.clean
        print(json.dumps(report))

    asyncio.run(main())
    """
)


@pytest.fixture
def forged(tmp_path: Path) -> Path:
    """Every blueprint an untrained Tamiyo may choose, compiled and catalogued (here, with torch)."""
    catalog = KarnCatalog()
    library = UrzaLibrary(tmp_path / "artifacts", f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        compiler = TezzeretCompiler(library.root, catalog=catalog, prewarm_iterations=2)
        for bid in DEFAULT_BLUEPRINT_CANDIDATES:
            result = compiler.compile(bid, None, d=8)
            library.save(catalog.get(bid), result.artifact_path, result.catalog_update)
    finally:
        library.close()
    return tmp_path


def _environment(root: Path, redis_url: str) -> dict[str, str]:
    prefixes = ("ESPER_", "OONA_", "URZA_", "TAMIYO_", "WEATHERLIGHT_", "KERNEL_", "ESP_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k != "REDIS_URL"}
    env.update(
        ESPER_LEYLINE_SECRET=SECRET,
        REDIS_URL=redis_url,
        ESPER_VAR_DIR=str(root / "var"),
        URZA_ARTIFACT_DIR=str(root / "artifacts"),
        URZA_DATABASE_URL=f"sqlite:///{root / 'catalog.db'}",
        TAMIYO_POLICY_DIR=str(root / "policies"),
        WEATHERLIGHT_HTTP_PORT="0",
        WEATHERLIGHT_TELEMETRY_INTERVAL_S="0.2",
    )
    return env


def test_the_running_control_plane_never_imports_torch(forged: Path, redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BOOT_AND_DRIVE],
        env=_environment(forged, redis_url),
        cwd=forged,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch_after_boot"] is False
    assert report["torch"] is False, report["torch_modules"]
    # ... and it did its work: a decision, a verified kernel, a prefetch answer, an applied update.
    assert report["command"] == "COMMAND_SEED"
    assert report["blueprint"] in DEFAULT_BLUEPRINT_CANDIDATES
    assert any(w.get("blueprint_id") == report["blueprint"] for w in report["warmed"])
    assert report["ready"][0] == report["blueprint"]
    assert len(report["ready"][1]) == 64
    assert report["policy_version"] == 1
    assert report["clean"] is True


#: What the control plane uses, each imported alone (the package ``__init__`` files come along).
TORCH_FREE = [
    "esper.weatherlight.cli",
    "from esper.urza import UrzaLibrary",
    "from esper.kasmina.warmer import KernelWarmer",
    "from esper.tamiyo.controller import TamiyoController",
    "from esper.tamiyo.service import TamiyoService",
    "from esper.tamiyo.metadata import UrzaBlueprintMetadata",
    "from esper.tamiyo.registry import TamiyoPolicyRegistry, load_policy",
    "from esper.tamiyo.payload import decode_payload",
    "from esper.tamiyo.policy import TamiyoPolicy",
    "from esper.tamiyo.features import extract_features",
]
#: Controls: torch-backed names stay importable from the packages and load torch when asked for.
TORCH_BACKED = [
    "from esper.urza import UrzaRuntime",
    "from esper.kasmina import KasminaSeedManager",
]


def _interpreter(statements: list[str]) -> subprocess.Popen[str]:
    """A fresh interpreter running ``statements`` in order, printing after each whether torch is loaded."""
    lines = ["import sys"]
    for statement in statements:
        lines += [statement if statement.startswith("from ") else f"import {statement}"]
        lines += ["print('torch' in sys.modules, flush=True)"]
    return subprocess.Popen(
        [sys.executable, "-c", "\n".join(lines)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def imports_torch() -> dict[str, bool]:
    """Whether each statement (run after the ones before it) brought torch in.

    The torch-free statements share one interpreter: importing a module runs
    its imports, so if any of them imported torch, torch would be loaded
    right after it. Each control runs alone.
    """
    groups = [TORCH_FREE] + [[statement] for statement in TORCH_BACKED]
    running = [(group, _interpreter(group)) for group in groups]
    found: dict[str, bool] = {}
    for group, proc in running:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        found.update(zip(group, (line == "True" for line in out.split()), strict=True))
    return found


@pytest.mark.parametrize("statement", TORCH_FREE)
def test_control_plane_imports_do_not_import_torch(statement: str, imports_torch: dict[str, bool]) -> None:
    assert not imports_torch[statement]


@pytest.mark.parametrize("statement", TORCH_BACKED)
def test_torch_backed_names_still_load_on_demand(statement: str, imports_torch: dict[str, bool]) -> None:
    assert imports_torch[statement]


def test_lazy_packages_list_their_names_and_refuse_unknown_ones() -> None:
    import esper.kasmina
    import esper.urza

    assert "UrzaRuntime" in dir(esper.urza)
    assert "KasminaSeedManager" in dir(esper.kasmina)
    with pytest.raises(AttributeError):
        esper.urza.NoSuchName  # noqa: B018
    with pytest.raises(AttributeError):
        esper.kasmina.NoSuchName  # noqa: B018
