"""Honest health in-process: real breakers, a read-only Redis, a wedged consumer, a late Redis.

Each fault is real: the Redis server is turned into a read-only replica with
``REPLICAOF`` (so the service's publishes fail and its breaker opens by
itself), a consumer's handler really blocks, the Redis server really starts
only after the service began to boot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _service_support import (
    LIMIT_S,
    SECRET,
    eventually,
    http_get,
    make_settings,
    metric,
    read_new,
    serving,
    status_of,
    weatherlight_packets,
    worker_view,
)

from esper.core.redis_server import RedisServer, free_port
from esper.core.worker import WorkerContext
from esper.kasmina.warmer import KernelWarmer
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing
from esper.weatherlight import BackoffPolicy, SdNotifier, WorkerSpec
from esper.weatherlight.service import WeatherlightService

FAST = BackoffPolicy(base_s=0.05, factor=2.0, cap_s=1.0, jitter=0.0)


@pytest.fixture(autouse=True)
def _isolated(isolated_env: Path) -> None:
    """No ESPER_* variables or .env from the caller leak into the settings under test."""


def breaker_state(prom: str) -> float:
    return metric(prom, "esper_weatherlight_breaker_state", breaker="service.publish")


async def readyz(port: int) -> tuple[int, str]:
    return await http_get(port, "/readyz?verbose")


async def test_readyz_is_503_while_a_required_publish_breaker_is_open_and_200_after(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory()
    service = WeatherlightService(
        make_settings(tmp_path, server.url),
        bus_overrides={"breaker_open_ms": 1500, "breaker_open_max_ms": 1500},
        backoff=FAST,
    )
    admin = aioredis.Redis.from_url(server.url)
    try:
        async with serving(service):
            port = service.http.port
            assert (await readyz(port))[0] == 200
            # A real fault: the server becomes a read-only replica of a master that does not exist.
            await admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
            seen: list[str] = []

            async def breaker_open() -> bool:
                code, body = await readyz(port)
                seen.append(body)
                bus_line = next((line for line in body.splitlines() if line.startswith("[-]bus failed:")), "")
                return code == 503 and "service.publish breaker open" in bus_line

            await eventually(
                breaker_open, "the telemetry publishes to open the service breaker", every_s=0.05
            )
            assert "[-]redis failed: read-only" in seen[-1]
            _code, prom = await http_get(port, "/metrics")
            assert (
                metric(prom, "esper_weatherlight_breaker_state", breaker="service.publish")
                == L.CIRCUIT_STATE_OPEN
            )
            health = (await status_of(service))["health"]
            assert health["status"] == "UNHEALTHY"
            assert any(
                p.startswith("bus: ") and "service.publish breaker open" in p for p in health["problems"]
            )

            await admin.execute_command("REPLICAOF", "NO", "ONE")  # writable again
            bodies: list[tuple[int, str]] = []

            async def ready() -> bool:
                bodies.append(await readyz(port))
                return bodies[-1][0] == 200

            await eventually(ready, "/readyz 200 once the breaker closed again", every_s=0.05)
            # Redis was fine again before the breaker let a publish through: readiness waited for it.
            breaker_only = [b for c, b in bodies if c == 503 and "[+]redis ok" in b and "[-]bus" in b]
            assert breaker_only, bodies
            assert "[+]bus ok" in bodies[-1][1]
            _code, prom = await http_get(port, "/metrics")
            assert (
                metric(prom, "esper_weatherlight_breaker_state", breaker="service.publish")
                != L.CIRCUIT_STATE_OPEN
            )
            assert not [w for w in (await status_of(service))["workers"] if w["status"] == "failed"]
    finally:
        await admin.aclose()


class WedgingWarmer(KernelWarmer):
    """The real warmer whose catalog handler blocks on its first update (e.g. a hung disk)."""

    wedged = asyncio.Event()
    attempts = 0

    async def _on_catalog_update(self, message: OonaMessage) -> None:
        if WedgingWarmer.attempts == 1:
            WedgingWarmer.wedged.set()
            await asyncio.Event().wait()
        await super()._on_catalog_update(message)


#: An idle consumer progresses at least once per blocking read, so silence well beyond one can only
#: be a wedge.
WEDGE_SILENCE_S = 1.6 * StreamConfig(instance="x").block_ms / 1000


class WedgeService(WeatherlightService):
    def specs(self) -> list[WorkerSpec]:
        return [
            replace(s, run=self._run_wedging_warmer, heartbeat_timeout_s=WEDGE_SILENCE_S)
            if s.name == "kasmina"
            else s
            for s in super().specs()
        ]

    async def _run_wedging_warmer(self, ctx: WorkerContext) -> None:
        """The kasmina worker's body, with the wedging warmer in place of the real one."""
        async with self.workers.role_client("kasmina") as client:
            WedgingWarmer.attempts += 1
            self.live.warmer = warmer = WedgingWarmer(client, self.live.need_library())
            await warmer.run(ctx)


async def test_a_wedged_consumer_next_to_an_idle_one_is_restarted(tmp_path: Path, redis_url: str) -> None:
    WedgingWarmer.attempts = 0
    WedgingWarmer.wedged = asyncio.Event()
    service = WedgeService(make_settings(tmp_path, redis_url), backoff=FAST)
    async with serving(service):
        publisher = OonaClient(redis_url, StreamConfig(instance="forge-1"), KeyRing(SECRET.encode()))
        try:
            update = L.KernelCatalogUpdate(blueprint_id="BP404")
            assert (await publisher.publish_kernel_catalog_update(update)).ok
        finally:
            await publisher.aclose()
        await asyncio.wait_for(WedgingWarmer.wedged.wait(), LIMIT_S)

        async def restarted() -> bool:
            view = worker_view(await status_of(service), "kasmina")
            return view["restarts"] >= 1 and view["status"] == "running"

        await eventually(restarted, "the kasmina worker restarted by its watchdog")
        view = worker_view(await status_of(service), "kasmina")
        assert view["last_error"]["type"] == "WatchdogTimeout"
        assert view["last_error"]["message"].startswith("kasmina.catalog made no progress")  # not .commands
        assert WedgingWarmer.attempts == 2  # a fresh warmer (and client) for the new attempt
        others = [w for w in (await status_of(service))["workers"] if w["name"] != "kasmina"]
        assert all(w["restarts"] == 0 for w in others)


async def test_boot_waits_for_a_redis_that_comes_up_late(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    port = free_port()
    service = WeatherlightService(make_settings(tmp_path, f"redis://127.0.0.1:{port}/0"), backoff=FAST)
    boot = asyncio.create_task(service.start())
    try:

        async def failed_twice() -> bool:
            names = [w["name"] for w in service.supervisor.snapshot()["workers"]]
            return "oona" in names and len(service.supervisor.delays("oona")) >= 2

        await eventually(failed_twice, "two failed attempts of the oona step", every_s=0.005)
        assert not boot.done()
        assert worker_view(await status_of(service), "oona")["last_error"]["type"] == "ConnectionError"
        await asyncio.to_thread(redis_server_factory, port=port)
        await asyncio.wait_for(boot, LIMIT_S)
        oona = worker_view(await status_of(service), "oona")
        assert oona["status"] == "running"
        assert oona["restarts"] >= 2
        assert (await http_get(service.http.port, "/readyz"))[0] == 200
    finally:
        if not boot.done():
            boot.cancel()
        await asyncio.gather(boot, return_exceptions=True)
        if service.supervisor.result is None:
            await service.stop()


def test_notify_socket_alone_means_no_watchdog_worker(tmp_path: Path, redis_url: str) -> None:
    settings = make_settings(tmp_path, redis_url)
    plain = WeatherlightService(settings, notifier=SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "n.sock")}))
    assert "sd_watchdog" not in [s.name for s in plain.specs()]
    env: dict[str, Any] = {"NOTIFY_SOCKET": str(tmp_path / "n.sock"), "WATCHDOG_USEC": "30000000"}
    watched = WeatherlightService(settings, notifier=SdNotifier(env), registry=None)
    [spec] = [s for s in watched.specs() if s.name == "sd_watchdog"]
    assert spec.required is False


Body = Callable[[WorkerContext], Awaitable[None]]


class HeldLastStepService(WeatherlightService):
    """The real service whose last boot step (housekeeping) starts only once ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    def specs(self) -> list[WorkerSpec]:
        return [replace(s, run=self._held(s.run)) if s.name == "housekeeping" else s for s in super().specs()]

    def _held(self, run: Body) -> Body:
        async def body(ctx: WorkerContext) -> None:
            await self.release.wait()
            await run(ctx)

        return body


async def test_no_telemetry_reports_the_service_down_while_later_boot_steps_start(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    service = HeldLastStepService(make_settings(tmp_path, redis_url), backoff=FAST)
    boot = asyncio.create_task(service.start())
    try:

        async def telemetry_running() -> bool:
            names = [w["name"] for w in service.supervisor.snapshot()["workers"]]
            return "telemetry" in names and worker_view(await status_of(service), "telemetry")["status"] == (
                "running"
            )

        await eventually(telemetry_running, "the telemetry worker running while boot waits for housekeeping")
        assert not boot.done()
        service.release.set()
        await asyncio.wait_for(boot, LIMIT_S)
        packets: list[L.TelemetryPacket] = []
        last = {"oona.telemetry": "0", "oona.emergency": "0"}
        while not packets:  # every packet so far, from both streams (an urgent one goes to emergency)
            for stream in last:
                last[stream], entries = await read_new(redis_client, stream, last[stream], block_ms=200)
                packets += weatherlight_packets(entries)
        for packet in packets:
            assert packet.system_health.status != L.HEALTH_STATUS_UNHEALTHY, packet.system_health.summary
            assert "required_path_down" not in [event.description for event in packet.events]
    finally:
        service.release.set()
        if not boot.done():
            boot.cancel()
        await asyncio.gather(boot, return_exceptions=True)
        if service.supervisor.result is None:
            await service.stop()
