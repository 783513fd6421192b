"""The composed Weatherlight service in-process, against a real Redis-protocol server and SQLite.

Nothing here is mocked: the service boots its real workers (Oona groups, the
Urza library and prefetch worker, Kasmina's warmer, Tamiyo, the emergency
consumer, telemetry, housekeeping) and serves its real HTTP probes on an
ephemeral port. Faults are injected only by subclassing the service and
adding or wrapping a ``WorkerSpec``: a worker that crashes, one that hangs,
one that ignores cancellation, one that fails for good. Waits are bounded:
events where the test owns the worker, otherwise short polls of the probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _service_support import (
    LIMIT_S,
    REQUESTS,
    SECRET,
    eventually,
    http_get,
    make_settings,
    metric,
    prefetch_entry,
    read_new,
    reply_ids,
    serving,
    status_of,
    weatherlight_packets,
    worker_view,
)

from esper.core.redis_server import RedisServer
from esper.core.settings import EsperSettings
from esper.core.worker import WorkerContext
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.weatherlight import BackoffPolicy, ShutdownResult, WorkerSpec
from esper.weatherlight.service import WeatherlightService

#: The documented boot order with an external Redis (see the service.py docstring).
BOOT_ORDER = [
    "http",
    "oona",
    "urza_library",
    "urza_prefetch",
    "kasmina",
    "tamiyo",
    "emergency",
    "telemetry",
    "housekeeping",
]


@pytest.fixture(autouse=True)
def _isolated(isolated_env: Path) -> None:
    """No ESPER_* variables or .env from the caller leak into the settings under test."""


# ------------------------------------------------------------------- boot and stop


class RecordingService(WeatherlightService):
    """The real service; each worker's first attempt records which workers were up at that moment."""

    def __init__(self, settings: EsperSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.boot_log: list[tuple[str, list[str]]] = []

    def specs(self) -> list[WorkerSpec]:
        return [replace(spec, run=self._recorded(spec)) for spec in super().specs()]

    def _recorded(self, spec: WorkerSpec) -> Callable[[WorkerContext], Awaitable[None]]:
        async def body(ctx: WorkerContext) -> None:
            if all(name != spec.name for name, _ in self.boot_log):
                up = [
                    w["name"]
                    for w in self.supervisor.snapshot()["workers"]
                    if w["status"] in ("running", "stopped") and w["name"] != spec.name
                ]
                self.boot_log.append((spec.name, up))
            await spec.run(ctx)

        return body


async def test_boots_in_documented_order_serves_probes_and_stops_cleanly(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    service = RecordingService(make_settings(tmp_path, redis_url))
    started = time.monotonic()
    async with serving(service):
        boot_s = time.monotonic() - started
        # Each step started only after every earlier step was up (gated, sequential boot).
        assert [name for name, _ in service.boot_log] == BOOT_ORDER
        for index, (name, up) in enumerate(service.boot_log):
            assert up == BOOT_ORDER[:index], f"{name} started while only {up} were up"

        port = service.http.port
        assert port != 0
        assert (await http_get(port, "/livez"))[0] == 200
        code, body = await http_get(port, "/readyz?verbose")
        assert code == 200, body
        for check in ("workers", "redis", "catalog", "bus"):
            assert f"[+]{check} ok" in body

        status = await status_of(service)
        assert [w["name"] for w in status["workers"]] == BOOT_ORDER
        for w in status["workers"]:
            assert w["status"] == "running", w
            assert w["restarts"] == 0
        assert status["health"]["status"] == "HEALTHY", status["health"]
        assert status["health"]["ready"] is True
        assert status["redis"] == "external"

        # Each subscription made its group on the stream it reads, and only there.
        async def groups_of(stream: str) -> set[str]:
            if not await redis_client.exists(stream):
                return set()
            return {g["name"].decode() for g in await redis_client.xinfo_groups(stream)}

        assert service.instance == "weatherlight-0"
        assert await groups_of(REQUESTS) == {"urza-prefetch"}
        assert await groups_of("oona.normal") == {"tamiyo"}
        assert await groups_of("oona.emergency") == {"weatherlight-emergency"}
        assert await groups_of("oona.policy") == {"tamiyo-policy.weatherlight-0"}
        for unread in ("oona.telemetry", "oona.kernels.ready", "oona.kernels.errors", "oona.deadletter"):
            assert await groups_of(unread) == set(), unread
        # The Urza library step really opened the SQLite catalogue.
        assert (tmp_path / "c.db").exists()

        # Telemetry flows on the telemetry stream with the documented metrics.
        last, packets = "0-0", []
        async with asyncio.timeout(LIMIT_S):
            while not packets:
                last, entries = await read_new(redis_client, "oona.telemetry", last)
                packets = weatherlight_packets(entries)
        packet = packets[0]
        names = {m.name for m in packet.metrics}
        for required in (
            "weatherlight.task_count",
            "weatherlight.open_breakers",
            "weatherlight.backoff_seconds",
            "weatherlight.uptime_s",
            "weatherlight.worker.urza_prefetch.running",
        ):
            assert required in names
        assert packet.system_health.status == L.HEALTH_STATUS_HEALTHY

        code, prom = await http_get(port, "/metrics")
        assert code == 200
        assert "oona_published_total" in prom
        # The supervisor's own series, computed at scrape time.
        for name in BOOT_ORDER:
            assert metric(prom, "esper_weatherlight_worker_up", worker=name) == 1.0, name
        assert metric(prom, "esper_weatherlight_worker_restarts_total", worker="oona") == 0.0
        assert "esper_weatherlight_worker_backoff_seconds" in prom
        assert (
            metric(prom, "esper_weatherlight_breaker_state", breaker="service.publish")
            == L.CIRCUIT_STATE_CLOSED
        )
        assert "urza_prefetch_answers_total" in prom or "urza_prefetch_latency_seconds" in prom

        stop_began = time.monotonic()
        result = await service.stop()
        stop_s = time.monotonic() - stop_began

    assert result == replace(result, clean=True, deadline_hit=False, stragglers=(), failed_required=())
    assert result.exit_code == 0
    assert boot_s < 15.0
    assert stop_s < 3.0
    assert {w["status"] for w in service.supervisor.snapshot()["workers"]} == {"stopped"}
    with pytest.raises(ConnectionRefusedError):
        await http_get(port, "/livez")  # the probe server is gone


# ------------------------------------------------------------- restart and recovery


class FlakyPrefetchService(WeatherlightService):
    """The real Urza prefetch worker, which crashes on demand and then fails ``failures`` restarts."""

    def __init__(self, settings: EsperSettings, *, failures: int, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.crash = asyncio.Event()
        self.recovered = asyncio.Event()
        self.failures_left = failures
        self.attempts = 0

    def specs(self) -> list[WorkerSpec]:
        return [replace(s, run=self._flaky) if s.name == "urza_prefetch" else s for s in super().specs()]

    async def _flaky(self, ctx: WorkerContext) -> None:
        self.attempts += 1
        if self.attempts > 1:
            if self.failures_left > 0:
                self.failures_left -= 1
                raise RuntimeError("injected: prefetch storage unavailable")
            self.recovered.set()
        real = asyncio.create_task(self.workers.run_prefetch(ctx))
        crash = asyncio.create_task(self.crash.wait())
        try:
            await asyncio.wait({real, crash}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            crash.cancel()
            real.cancel()
            await asyncio.gather(real, crash, return_exceptions=True)
        if self.crash.is_set():
            self.crash.clear()
            raise RuntimeError("injected: prefetch worker crashed")


async def test_crashed_worker_restarts_with_backoff_and_health_recovers(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    policy = BackoffPolicy(base_s=0.2, factor=2.0, cap_s=5.0, jitter=0.0)
    service = FlakyPrefetchService(make_settings(tmp_path, redis_url), failures=2, backoff=policy)
    keyring = KeyRing(SECRET.encode())
    async with serving(service):
        port = service.http.port
        # The first packet follows the end of boot, so the stream may not exist yet: then all is new.
        last_id = "0-0"
        if await redis_client.exists("oona.telemetry"):
            last_id = (await redis_client.xinfo_stream("oona.telemetry"))["last-generated-id"].decode()
        service.crash.set()

        seen: list[tuple[str, int, float]] = []

        async def observe() -> bool:
            view = worker_view(await status_of(service), "urza_prefetch")
            seen.append((view["status"], view["restarts"], view["backoff_seconds"]))
            return view["status"] == "running" and view["restarts"] == 3

        await eventually(observe, "urza_prefetch running again after 3 restarts")
        assert service.recovered.is_set()

        # /status showed the worker backing off, with the growing delays, and the restarts counting up.
        backing_off = [(r, b) for s, r, b in seen if s == "backing_off"]
        assert backing_off, seen
        assert {b for _, b in backing_off} <= {0.2, 0.4, 0.8}
        assert 0.8 in {b for _, b in backing_off}
        assert [r for _, r, _ in seen] == sorted(r for _, r, _ in seen)
        assert service.supervisor.delays("urza_prefetch") == pytest.approx([0.2, 0.4, 0.8])
        final = worker_view(await status_of(service), "urza_prefetch")
        assert final["backoff_seconds"] == 0.0
        assert "injected" in final["last_error"]["message"]
        assert service.attempts == 4
        # No other worker was disturbed.
        others = [w for w in (await status_of(service))["workers"] if w["name"] != "urza_prefetch"]
        assert all(w["restarts"] == 0 for w in others)

        # Telemetry said DEGRADED (naming the worker) while it backed off, then HEALTHY again.
        health: list[tuple[int, str]] = []
        async with asyncio.timeout(LIMIT_S):
            while not (
                any(h == L.HEALTH_STATUS_DEGRADED for h, _ in health)
                and health[-1][0] == L.HEALTH_STATUS_HEALTHY
            ):
                last_id, entries = await read_new(redis_client, "oona.telemetry", last_id)
                health += [
                    (p.system_health.status, p.system_health.summary) for p in weatherlight_packets(entries)
                ]
        degraded = [s for h, s in health if h == L.HEALTH_STATUS_DEGRADED]
        assert any("urza_prefetch:backing_off" in s for s in degraded), health
        first_bad = next(i for i, (h, _) in enumerate(health) if h == L.HEALTH_STATUS_DEGRADED)
        assert L.HEALTH_STATUS_HEALTHY in [h for h, _ in health[first_bad:]]

        # The restarted worker really serves requests again: a request gets its reply.
        client = OonaClient(redis_url, StreamConfig(instance="trainer-1"), keyring)
        try:
            request = L.KernelPrefetchRequest(request_id="after-recovery", blueprint_id="BP404")
            request.issued_at.GetCurrentTime()
            assert (await client.publish_kernel_prefetch_request(request)).ok
        finally:
            await client.aclose()

        async def answered() -> bool:
            return "after-recovery" in await reply_ids(redis_client)

        await eventually(answered, "a reply from the restarted prefetch worker")
        assert (await http_get(port, "/readyz"))[0] == 200


class DoomedService(WeatherlightService):
    """Adds a required worker that always fails shortly after it starts."""

    def __init__(self, settings: EsperSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.doomed_attempts = 0

    def specs(self) -> list[WorkerSpec]:
        doomed = WorkerSpec("doomed", self._doomed, max_restarts=2, max_restarts_window_s=30.0)
        return [*super().specs(), doomed]

    async def _doomed(self, ctx: WorkerContext) -> None:
        self.doomed_attempts += 1
        ctx.started()
        await asyncio.sleep(0.05)
        raise RuntimeError("injected: doomed worker cannot run")


async def test_restart_intensity_breach_of_required_worker_ends_service_non_zero(
    tmp_path: Path, redis_url: str
) -> None:
    policy = BackoffPolicy(base_s=0.05, factor=2.0, cap_s=1.0, jitter=0.0)
    service = DoomedService(make_settings(tmp_path, redis_url), backoff=policy)
    result: ShutdownResult = await asyncio.wait_for(service.run(), 30.0)

    assert result.failed_required == ("doomed",)
    assert result.exit_code == 1
    assert result.boot_error is None
    assert service.doomed_attempts == 3  # the first run plus max_restarts=2, then given up
    assert service.supervisor.delays("doomed") == pytest.approx([0.05, 0.1])
    doomed = service.supervisor.worker("doomed")
    assert doomed["status"] == "failed"
    assert "injected" in doomed["last_error"]["message"]
    # The other workers were drained, not left running.
    assert all(
        w["status"] == "stopped" for w in service.supervisor.snapshot()["workers"] if w["name"] != "doomed"
    )


class HungService(WeatherlightService):
    """Adds a worker whose first attempt stops heartbeating (hangs) while later ones are healthy."""

    def __init__(self, settings: EsperSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.attempts = 0
        self.hung_at = 0.0
        self.first_cancelled = False
        self.alive = asyncio.Event()

    def specs(self) -> list[WorkerSpec]:
        return [*super().specs(), WorkerSpec("stuck", self._stuck, heartbeat_timeout_s=0.3, grace_s=0.5)]

    async def _stuck(self, ctx: WorkerContext) -> None:
        self.attempts += 1
        ctx.started()
        if self.attempts == 1:
            self.hung_at = time.monotonic()
            try:
                await asyncio.Event().wait()  # stuck forever, no heartbeats (but cancellable)
            except asyncio.CancelledError:
                self.first_cancelled = True
                raise
        self.alive.set()
        while not await ctx.wait_stopping(0.05):
            ctx.progress()


async def test_watchdog_restarts_a_hung_worker(tmp_path: Path, redis_url: str) -> None:
    policy = BackoffPolicy(base_s=0.05, factor=2.0, cap_s=1.0, jitter=0.0)
    service = HungService(make_settings(tmp_path, redis_url), backoff=policy)
    async with serving(service):
        await asyncio.wait_for(service.alive.wait(), LIMIT_S)
        restarted_after = time.monotonic() - service.hung_at
        assert service.first_cancelled  # the watchdog cancelled the hung attempt
        assert 0.3 <= restarted_after < 3.0, restarted_after
        view = worker_view(await status_of(service), "stuck")
        assert view["restarts"] == 1
        assert view["status"] == "running"
        assert view["last_error"]["type"] == "WatchdogTimeout"
        # A heartbeating attempt is left alone for well over its timeout.
        await asyncio.sleep(0.9)
        status = await status_of(service)
        assert worker_view(status, "stuck")["restarts"] == 1
        assert service.attempts == 2
        assert status["restarts_total"] == 1  # the real workers' heartbeats kept their watchdogs quiet


class DeafService(WeatherlightService):
    """Adds a worker that swallows every cancellation until the test releases it."""

    def __init__(self, settings: EsperSettings, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.release = asyncio.Event()
        self.cancels = 0

    def specs(self) -> list[WorkerSpec]:
        return [*super().specs(), WorkerSpec("deaf", self._deaf, grace_s=10.0)]

    async def _deaf(self, ctx: WorkerContext) -> None:
        ctx.started()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancels += 1  # ignored on purpose


async def test_worker_ignoring_cancellation_ends_shutdown_at_deadline_non_zero(
    tmp_path: Path, redis_url: str
) -> None:
    service = DeafService(make_settings(tmp_path, redis_url, weatherlight_shutdown_timeout_s=0.5))
    try:
        async with serving(service):
            began = time.monotonic()
            result = await asyncio.wait_for(service.stop(), 5.0)
            took = time.monotonic() - began
        assert result.deadline_hit
        assert "deaf" in result.stragglers
        assert not result.clean
        assert result.exit_code == 1
        assert service.cancels >= 1  # it was asked to stop and refused
        assert 0.5 <= took < 1.5, took  # ends at the deadline, does not wait out the 10 s grace
    finally:
        service.release.set()
        abandoned = service.supervisor.abandoned
        if abandoned:
            await asyncio.wait(abandoned, timeout=5.0)


async def test_readyz_is_503_while_redis_is_down_and_200_after_it_returns(
    tmp_path: Path, redis_server_factory: Callable[..., RedisServer]
) -> None:
    server = redis_server_factory(append_only=True)
    # A short breaker window: after the outage the publish paths are probed again within a second.
    service = WeatherlightService(
        make_settings(tmp_path, server.url),
        bus_overrides={"breaker_open_ms": 1000, "breaker_open_max_ms": 1000},
    )
    async with serving(service):
        port = service.http.port
        assert (await http_get(port, "/readyz"))[0] == 200

        await asyncio.to_thread(server.kill)
        bodies: list[str] = []

        async def not_ready() -> bool:
            code, body = await http_get(port, "/readyz?verbose")
            bodies.append(body)
            return code == 503

        await eventually(not_ready, "/readyz 503 with Redis down", every_s=0.05)
        assert "[-]redis" in bodies[-1]
        assert "[+]catalog ok" in bodies[-1]  # only the bus check failed
        assert (await http_get(port, "/livez"))[0] == 200  # alive, just not ready

        await asyncio.sleep(1.2)  # an outage longer than the consumers' block time
        assert (await http_get(port, "/readyz"))[0] == 503
        # Housekeeping rides out the outage instead of failing its (required) worker.
        await service.housekeeping()
        assert service.housekeeping_skipped >= 1
        await asyncio.to_thread(server.start)  # same port, same data dir (append-only file)

        async def ready() -> bool:
            return (await http_get(port, "/readyz"))[0] == 200

        await eventually(ready, "/readyz 200 after Redis returned", limit_s=20.0, every_s=0.05)
        status = await status_of(service)
        assert not [w for w in status["workers"] if w["status"] == "failed"]

        # Same server identity: the groups made at boot came back from the append-only file.
        redis = aioredis.Redis.from_url(server.url)
        try:
            groups = {g["name"].decode() for g in await redis.xinfo_groups(REQUESTS)}
        finally:
            await redis.aclose()
        assert "urza-prefetch" in groups

        # The bus works again within seconds (consumers' breakers probe quickly):
        # a kernel request sent now is answered.
        redis = aioredis.Redis.from_url(server.url)
        try:
            request_id = f"after-outage-{uuid.uuid4().hex}"
            await redis.xadd(
                REQUESTS,
                prefetch_entry(KeyRing(SECRET.encode()), request_id, issued_at_ms=int(time.time() * 1000)),
            )

            async def answered() -> bool:
                return request_id in await reply_ids(redis)

            await eventually(answered, "a reply after the outage", limit_s=20.0, every_s=0.1)
        finally:
            await redis.aclose()
        result = await service.stop()
    assert result.exit_code == 0
    assert result.elapsed_s < 5.0


async def _outcomes(
    redis: aioredis.Redis, *, replies: set[str], dead_letters: set[str]
) -> tuple[list[str], list[str]]:
    """Block on the reply and dead-letter streams until every expected outcome has been written.

    Returns every reply request id and every dead-letter reason for ``REQUESTS`` seen by then.
    The prefetch worker answers concurrently, so outcomes arrive in any order: each one is
    awaited for itself, never inferred from another's arrival.
    """
    streams = {"oona.kernels.ready": "0", "oona.kernels.errors": "0", "oona.deadletter": "0"}
    kinds = {"oona.kernels.ready": L.KernelArtifactReady, "oona.kernels.errors": L.KernelArtifactError}
    ids: list[str] = []
    reasons: list[str] = []
    deadline = time.monotonic() + LIMIT_S
    while not (replies <= set(ids) and dead_letters <= set(reasons)):
        assert time.monotonic() < deadline, f"after {LIMIT_S}s only replies {ids}, dead letters {reasons}"
        for raw_stream, items in await redis.xread(streams, block=1000) or []:  # type: ignore[arg-type]
            stream = raw_stream.decode()
            for entry_id, fields in items:
                streams[stream] = entry_id.decode()
                if stream == "oona.deadletter":
                    if fields[b"source_stream"] == REQUESTS.encode():
                        reasons.append(fields[b"reason"].decode())
                    continue
                envelope = L.BusEnvelope()
                envelope.ParseFromString(fields[b"payload"])
                message = kinds[stream]()
                message.ParseFromString(envelope.payload)
                ids.append(message.request_id)
    return ids, reasons


async def test_stale_and_replayed_kernel_requests_are_dropped_and_counted(
    tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    keyring = KeyRing(SECRET.encode())
    service = WeatherlightService(make_settings(tmp_path, redis_url))
    async with serving(service):
        now_ms = time.time_ns() // 1_000_000
        stale = prefetch_entry(keyring, "stale-request", issued_at_ms=now_ms - 10 * 60_000)
        replayed = prefetch_entry(keyring, "replayed-request", issued_at_ms=now_ms)
        fresh = prefetch_entry(keyring, "fresh-request", issued_at_ms=now_ms)
        await redis_client.xadd(REQUESTS, stale)  # type: ignore[arg-type]
        await redis_client.xadd(REQUESTS, replayed)  # type: ignore[arg-type]
        await redis_client.xadd(REQUESTS, replayed)  # type: ignore[arg-type]  # same nonce again
        await redis_client.xadd(REQUESTS, fresh)  # type: ignore[arg-type]

        # Every outcome awaited for itself: two replies, two dead letters (rejections are counted
        # before their dead letter is written, so the counters below are final by then).
        ids, reasons = await _outcomes(
            redis_client, replies={"replayed-request", "fresh-request"}, dead_letters={"replay", "stale"}
        )
        assert sorted(reasons) == ["replay", "stale"], reasons  # both dead-lettered with their reasons
        assert ids.count("stale-request") == 0, ids
        assert ids.count("replayed-request") == 1, ids  # the original is answered, its replay is not
        assert ids.count("fresh-request") == 1, ids

        _code, prom = await http_get(service.http.port, "/metrics")
        assert metric(prom, "oona_rejected_total", stream=REQUESTS, reason="stale") == 1.0
        assert metric(prom, "oona_rejected_total", stream=REQUESTS, reason="replay") == 1.0
        components = (await status_of(service))["components"]
        assert components["oona.rejected.stale"] == 1.0
        assert components["oona.rejected.replay"] == 1.0
        # Nothing else was answered or dead-lettered late: every request has had its one outcome.
        assert sorted(await reply_ids(redis_client)) == ["fresh-request", "replayed-request"]
