"""``esper-weatherlight-service`` as a real process: exit codes, signals, the embedded server, the bus.

Each test runs the installed console script (or, for the intensity limit, the
same ``service_main`` with one extra failing worker) in an empty working
directory with no inherited Esper variables, and talks to it only from the
outside: HTTP probes, the Redis-protocol server, signals and exit codes.
Waits poll real conditions with an overall bound.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from _process_support import SECRET, Service, alive, base_env, run_cli
from torch import nn

from esper import __version__
from esper.core.redis_server import embedded_url
from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.kasmina import (
    AlphaSchedule,
    KasminaCommandIntake,
    KasminaPrefetchCoordinator,
    KasminaSeedManager,
    SeedSlot,
)
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing, sign_command
from esper.tezzeret import TezzeretForge
from esper.urza import UrzaLibrary, UrzaRuntime

D = 16
RUN = "run-weatherlight-cli"


# ----------------------------------------------------------------- configuration


def test_version(tmp_path: Path) -> None:
    done = run_cli(base_env(tmp_path), tmp_path, "--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"esper-weatherlight-service {__version__}"


def test_check_passes_on_good_configuration(tmp_path: Path, redis_url: str) -> None:
    done = run_cli(base_env(tmp_path, REDIS_URL=redis_url), tmp_path, "--check")
    assert done.returncode == 0, done.stderr
    assert "configuration and preflight OK (external Redis)" in done.stdout
    assert SECRET not in done.stdout + done.stderr


def test_check_lists_every_problem_and_never_prints_a_secret(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    previous = "previous-secret-value-must-not-leak-42"
    env = base_env(
        tmp_path,
        URZA_ARTIFACT_DIR=str(tmp_path / "not-a-dir" / "artifacts"),
        ESPER_LEYLINE_PREVIOUS_SECRETS=previous,
    )
    del env["ESPER_LEYLINE_SECRET"]
    done = run_cli(env, tmp_path, "--check")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "ESPER_LEYLINE_SECRET is missing or empty" in done.stderr
    assert "URZA_ARTIFACT_DIR" in done.stderr
    assert "not writable" in done.stderr
    assert previous not in output
    assert "Traceback" not in output


@pytest.mark.parametrize("start", [("--check",), ()], ids=["check", "start"])
def test_an_unusable_var_dir_or_cluster_is_a_listed_problem_not_a_traceback(
    tmp_path: Path, start: tuple[str, ...]
) -> None:
    var_file = tmp_path / "var-is-a-file"
    var_file.write_text("a file where the var dir should be")
    locked_dir = tmp_path / "lock-is-a-dir"
    (locked_dir / "weatherlight.lock").mkdir(parents=True)
    cluster = "redis+cluster://:pw-must-not-leak@127.0.0.1:1,127.0.0.1:2"
    for extra, expected in (
        ({"ESPER_VAR_DIR": str(var_file)}, "ESPER_VAR_DIR"),
        ({"ESPER_VAR_DIR": str(locked_dir)}, "ESPER_VAR_DIR: cannot use the lock file"),
        ({"REDIS_URL": cluster}, "is unreachable"),
    ):
        done = run_cli(base_env(tmp_path, **extra), tmp_path, *start)
        output = done.stdout + done.stderr
        assert done.returncode == 2, output
        assert expected in done.stderr
        assert "Traceback" not in output
        assert "pw-must-not-leak" not in output


# ------------------------------------------------------------------------ signals


def test_sigterm_during_boot_exits_promptly_and_cleanly(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    env = base_env(tmp_path)  # embedded Redis: the longest boot
    service = start_service(env)
    assert service.first_line.wait(30.0), "no log output"
    code, took = service.terminate_and_wait()
    output = service.output
    assert code == 0, output
    assert took < 3.0, took
    assert "Traceback" not in output
    assert "signal received: shutting down" in output
    assert "stopped during boot" in output
    assert "worker=housekeeping" not in output  # the boot never completed: it was stopped mid-way
    port_file = tmp_path / "var" / "redis" / "port"
    if port_file.exists():  # the private server, if it was started, was stopped too
        client = redis.Redis(port=int(port_file.read_text()), socket_connect_timeout=0.5)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        client.close()


def test_embedded_server_started_and_stopped_with_the_service(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(tmp_path))
    service.wait_ready()
    code, body = service.get("/readyz?verbose")
    assert code == 200
    assert "[+]redis ok" in body
    status = json.loads(service.get("/status")[1])
    assert status["redis"] == "embedded"
    assert [w["name"] for w in status["workers"]][:3] == ["http", "redis", "oona"]

    url = embedded_url(tmp_path / "var")
    assert url.split("@")[0].split(":")[-1] not in service.output  # the password is never logged
    assert "redis://:***@127.0.0.1:" in service.output
    client = redis.Redis.from_url(url, socket_connect_timeout=1.0)
    assert client.ping() is True
    assert client.config_get("appendonly")["appendonly"] == "yes"
    assert client.xinfo_groups("oona.kernels.requests")  # the service's own groups live there
    client.close()
    match = re.search(r"embedded redis started.*?pid=(\d+)", service.output)
    assert match, service.output
    child = int(match.group(1))
    assert alive(child)

    code, took = service.terminate_and_wait()
    assert code == 0, service.output
    assert took < 3.0, took
    assert "Traceback" not in service.output
    assert "embedded redis stopped" in service.output
    assert not alive(child)
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()


_DOOMED = textwrap.dedent(
    """
    import asyncio, sys
    from esper.weatherlight import cli, service
    from esper.weatherlight import BackoffPolicy, WorkerSpec

    class Doomed(service.WeatherlightService):
        def __init__(self, settings, **kwargs):
            super().__init__(settings, backoff=BackoffPolicy(base_s=0.05, jitter=0.0), **kwargs)

        def specs(self):
            return [*super().specs(), WorkerSpec("doomed", self.doomed, max_restarts=2)]

        async def doomed(self, ctx):
            ctx.started()
            await asyncio.sleep(0.05)
            raise RuntimeError("injected: the catalogue replica is gone")

    service.WeatherlightService = Doomed  # what the CLI imports when it runs
    sys.exit(cli.service_main([]))
    """
)


def test_intensity_limit_on_a_required_worker_ends_the_process_non_zero(
    tmp_path: Path, redis_url: str, start_service: Callable[..., Service]
) -> None:
    env = base_env(tmp_path, REDIS_URL=redis_url)
    service = start_service(env, argv=[sys.executable, "-c", _DOOMED])
    code = service.proc.wait(timeout=30)
    service.kill()  # joins the output reader
    output = service.output
    assert code == 1, output
    assert "restart intensity exceeded" in output
    assert "required worker failed" in output
    assert output.count("injected: the catalogue replica is gone") >= 3
    assert output.count("Traceback (most recent call last)") == 3  # every failure, with its traceback


# ----------------------------------------------------------- the bus, end to end


def host_model() -> nn.Sequential:
    torch.manual_seed(0)
    slot = SeedSlot(nn.Linear(D, D), D, name="seed-1")
    return nn.Sequential(nn.Linear(4, D), nn.ReLU(), slot, nn.Linear(D, 2))


class AttachingCoordinator(KasminaPrefetchCoordinator):
    """The real coordinator; ``handled`` is set after every ready reply it processed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handled = asyncio.Event()

    async def handle_ready(self, message: OonaMessage) -> None:
        await super().handle_ready(message)
        self.handled.set()


def germinate(keyring: KeyRing, seed_id: str, blueprint_id: str) -> L.AdaptationCommand:
    command = L.AdaptationCommand(
        version=1,
        command_id=uuid.uuid4().hex,
        command_type=L.COMMAND_SEED,
        target_seed_id=seed_id,
        issued_by="test",
    )
    command.seed_operation.operation = L.SEED_OP_GERMINATE
    command.seed_operation.blueprint_id = blueprint_id
    command.annotations["training_run_id"] = RUN
    command.issued_at.GetCurrentTime()
    sign_command(command, keyring)
    return command


async def test_training_process_gets_kernel_from_service_and_attaches(
    tmp_path: Path, redis_url: str, start_service: Callable[..., Service]
) -> None:
    urza = tmp_path / "urza"
    with UrzaLibrary(urza, f"sqlite:///{urza / 'catalog.db'}") as forge_library:
        report = await TezzeretForge(KarnCatalog(), forge_library).arun(D, ["BP009"])
        assert report.compiled == ["BP009"]
    service = start_service(base_env(tmp_path, REDIS_URL=redis_url))
    await asyncio.to_thread(service.wait_ready)

    keyring = KeyRing(SECRET.encode())
    library = UrzaLibrary(urza, f"sqlite:///{urza / 'catalog.db'}")
    client = OonaClient(redis_url, StreamConfig(instance="trainer-1", block_ms=200), keyring)
    manager = KasminaSeedManager(
        runtime=UrzaRuntime(library),
        keys=keyring,
        training_run_id=RUN,
        training_steps=2,
        shadowing_steps=2,
        alpha_schedule=AlphaSchedule(total_steps=6, temperature=1.0),
        prefetch_timeout_seconds=5.0,
    )
    manager.register_host_model(host_model())
    coordinator = AttachingCoordinator(
        client, manager, UrzaRuntime(library), training_run_id=RUN, expire_interval_s=0.05
    )
    intake = KasminaCommandIntake(client, manager)
    try:
        async with running(coordinator.run, "coordinator"), running(intake.run, "intake"):
            async with asyncio.timeout(20.0):
                # Germinate over the bus: the command reaches this process's intake ...
                assert (await client.publish_command(germinate(keyring, "seed-1", "BP009"))).ok
                await coordinator.handled.wait()
    finally:
        await client.aclose()
        library.close()

    seed = manager.get_seed("seed-1")
    assert seed is not None
    assert seed.kernel is not None
    # ... its KernelPrefetchRequest was answered by the service's Urza worker, verified and attached.
    assert seed.kernel_source == "bus"
    assert not seed.used_fallback
    assert seed.stage == L.SEED_STAGE_TRAINING
    assert coordinator.count("requests_sent") == 1
    assert coordinator.count("attached") == 1
    assert type(seed.kernel).__name__ == "ResidualMLP"
    slot = manager.slot_for("seed-1")
    assert slot is not None
    assert slot.kernel is seed.kernel

    status = json.loads((await asyncio.to_thread(service.get, "/status"))[1])
    assert status["components"]["urza.prefetch.ready"] == 1.0
    code, _took = await asyncio.to_thread(service.terminate_and_wait)
    assert code == 0, service.output
