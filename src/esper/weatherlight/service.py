"""Weatherlight: boots the control plane in order and supervises it.

Boot order (each step gates the next; see ``WeatherlightService.specs``):
HTTP probes → embedded Redis (only without ``REDIS_URL``) → Oona (this
replica's instance name, leased in Redis, and the service's own client) →
Urza library → Urza prefetch worker
→ Kasmina kernel warmer → Tamiyo (system states and policy updates) →
emergency-stream consumer → telemetry → housekeeping → systemd watchdog
(only when systemd asked for one). Shutdown runs in reverse, so the HTTP
server reports "not ready" for the whole drain, Oona closes after every bus
worker and the embedded server stops last.

Every worker body builds what it runs on each attempt: its own Oona client
(own connections and breakers), its components and their metrics registry.
A restart therefore starts clean; nothing of a failed attempt is reused.
All clients share one metrics object on the service registry. One service
runs per var dir (:class:`~esper.core.instance_lock.InstanceLock`).
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from esper.core.http_server import HealthServer
from esper.core.instance_lock import InstanceLock
from esper.core.logs import get_logger
from esper.core.redis_server import RedisServer, ServerOptions, embedded_options
from esper.core.settings import EsperSettings
from esper.core.telemetry import indicated_priority, stamp_instance
from esper.core.worker import WorkerContext
from esper.kasmina.warmer import KernelWarmer
from esper.leyline import leyline_pb2
from esper.oona import (
    InstanceLease,
    KeySpace,
    OonaClient,
    OonaMessage,
    OonaMetrics,
    StreamConfig,
    connect,
    hash_tag_for,
    instance_token,
)
from esper.security import KeyRing
from esper.tamiyo import TamiyoController
from esper.tamiyo.metadata import UrzaBlueprintMetadata
from esper.tamiyo.service import TamiyoService
from esper.urza import UrzaLibrary
from esper.urza.prefetch import UrzaPrefetchWorker
from esper.weatherlight.health import UNHEALTHY, Health, bus_problems, judge, probe_catalog, probe_redis
from esper.weatherlight.metrics import AttemptRegistries, SupervisorCollector
from esper.weatherlight.periodic import run_every
from esper.weatherlight.sdnotify import SdNotifier
from esper.weatherlight.specs import BackoffPolicy, BootError, ShutdownResult, WorkerSpec
from esper.weatherlight.supervisor import Supervisor
from esper.weatherlight.telemetry import build_weatherlight_packet

_log = get_logger("esper.weatherlight")
#: Instance names of control-plane replicas are ``weatherlight-<n>``.
INSTANCE_SERVICE = "weatherlight"
#: A consumer reads with a 1 s block, so an idle one progresses every second; a minute of silence is a wedge.
CONSUMER_HEARTBEAT_S = 60.0
_ALL_TYPES = frozenset(v for v in leyline_pb2.BusMessageType.values() if v)
#: The group that reads the emergency stream (every other group belongs to its component).
EMERGENCY_GROUP = "weatherlight-emergency"
#: Room for the signed envelope around Oona's largest payload, for the server's bulk limit.
_ENVELOPE_MARGIN_BYTES = 64 * 1024


class WeatherlightService:
    """The composed control plane. ``await run()`` returns a ``ShutdownResult``.

    ``bus_overrides`` tune every role's ``StreamConfig`` (tests shorten
    breaker windows with it).
    """

    def __init__(
        self,
        settings: EsperSettings,
        *,
        backoff: BackoffPolicy | None = None,
        maintenance_every: int = 10,
        notifier: SdNotifier | None = None,
        registry: CollectorRegistry | None = None,
        bus_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = KeyRing(*settings.signing_secrets())
        self.registry = registry if registry is not None else CollectorRegistry()
        self.oona_metrics = OonaMetrics(self.registry)
        self.supervisor = Supervisor(backoff)
        self.notifier = notifier or SdNotifier()
        self.maintenance_every = max(1, maintenance_every)
        self.bus_overrides = dict(bus_overrides or {})
        self.lock = InstanceLock(settings.var_dir)
        self.attempt_metrics = AttemptRegistries()
        self.registry.register(self.attempt_metrics)
        self.registry.register(SupervisorCollector(self.supervisor.snapshot, self.breaker_states))
        self.http = HealthServer(
            settings.weatherlight_http_host,
            settings.weatherlight_http_port,
            registry=self.registry,
            status=self.status,
        )
        self.http.add_checks("health", self._readiness, timeout_s=3.0)
        #: The embedded server's options (set at start when ``REDIS_URL`` is unset) and current process.
        self.embedded_options: ServerOptions | None = None
        self.embedded: RedisServer | None = None
        self.clients: dict[str, OonaClient] = {}
        self.library: UrzaLibrary | None = None
        self.prefetch: UrzaPrefetchWorker | None = None
        self.warmer: KernelWarmer | None = None
        self.tamiyo: TamiyoService | None = None
        self.emergencies: Tally[str] = Tally()
        self.housekeeping_skipped = 0
        self.last_health: Health | None = None
        #: This replica's consumer name in every group (``OONA_CONSUMER_NAME`` or a leased slot).
        self.instance: str | None = settings.oona_consumer_name
        self._ticks = 0

    # -- composition ---------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        if self.settings.redis_url is not None:
            return self.settings.redis_url
        if self.embedded_options is None:
            raise RuntimeError("the embedded server is set up when the service starts")
        return self.embedded_options.url

    def specs(self) -> list[WorkerSpec]:
        """The workers in boot order."""
        interval = self.settings.weatherlight_telemetry_interval_s
        housekeeping = self.settings.weatherlight_housekeeping_interval_s
        consumer = {"heartbeat_timeout_s": CONSUMER_HEARTBEAT_S}
        # The HTTP port is a boot step that cannot fix itself: fail within a few seconds, naming it.
        specs = [WorkerSpec("http", self.http.run, grace_s=1.0, ready_timeout_s=5.0)]
        if self.settings.redis_url is None:
            specs.append(WorkerSpec("redis", self._run_embedded, grace_s=5.0))
        specs += [
            WorkerSpec("oona", self._run_oona),
            WorkerSpec("urza_library", self._run_library),
            WorkerSpec("urza_prefetch", self._run_prefetch, **consumer),  # type: ignore[arg-type]
            WorkerSpec("kasmina", self._run_warmer, **consumer),  # type: ignore[arg-type]
            WorkerSpec("tamiyo", self._run_tamiyo, **consumer),  # type: ignore[arg-type]
            WorkerSpec("emergency", self._run_emergency, **consumer),  # type: ignore[arg-type]
            WorkerSpec(
                "telemetry",
                lambda ctx: run_every(ctx, interval, self.publish_telemetry),
                heartbeat_timeout_s=max(30.0, 3 * interval),
            ),
            WorkerSpec(
                "housekeeping",
                lambda ctx: run_every(ctx, housekeeping, self.housekeeping),
                heartbeat_timeout_s=max(300.0, 3 * housekeeping),
            ),
        ]
        if self.notifier.watchdog_enabled:
            specs.append(
                WorkerSpec(
                    "sd_watchdog", lambda ctx: self.notifier.run_watchdog(ctx, self._serving), required=False
                )
            )
        return specs

    def _config(self, role: str) -> StreamConfig:
        if self.instance is None:
            raise RuntimeError("the instance name is leased by the oona step")
        config = StreamConfig.from_settings(self.settings, instance=self.instance)
        if role == "service":
            # Telemetry must never stall its worker waiting for a breaker.
            config = replace(config, publish_breaker_wait_ms=100)
        return replace(config, **self.bus_overrides) if self.bus_overrides else config

    @asynccontextmanager
    async def _role_client(self, role: str) -> AsyncIterator[OonaClient]:
        """A fresh client for one attempt of a role's worker, visible to health and metrics meanwhile."""
        client = OonaClient(
            self.redis_url, self._config(role), self.keyring, metrics=self.oona_metrics, name=role
        )
        self.clients[role] = client
        try:
            yield client
        finally:
            if self.clients.get(role) is client:
                del self.clients[role]
            await client.aclose()

    def _need_library(self) -> UrzaLibrary:
        if self.library is None:
            raise RuntimeError("the Urza library is not open")
        return self.library

    # -- resource workers ----------------------------------------------------------

    async def _run_embedded(self, ctx: WorkerContext) -> None:
        """The private bus server: started fresh each attempt; its death is this worker's failure."""
        assert self.embedded_options is not None
        server = RedisServer(self.embedded_options)
        await server.astart()
        self.embedded = server
        pid = server.pid
        _log.info("embedded redis started", pid=pid, url=server.display_url, dir=str(server.options.data_dir))
        try:
            ctx.started()
            exited = asyncio.create_task(server.wait_exit(), name="embedded-redis-exit")
            stopping = asyncio.create_task(ctx.stopping.wait(), name="embedded-redis-stopping")
            try:
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (exited, stopping):
                    task.cancel()
                await asyncio.gather(exited, stopping, return_exceptions=True)
            if not ctx.stopping.is_set():
                raise server.exited_error(exited.result())
        finally:
            await server.astop()
            _log.info("embedded redis stopped", pid=pid)

    async def _run_oona(self, ctx: WorkerContext) -> None:
        """Lease this replica's instance name, then hold the service's own client until the end.

        The lease's token lives in the var dir, so a restart of this replica
        (even after kill -9) gets its name back and resumes its own pending
        entries at once; the lease is renewed while the service runs.
        """
        if self.settings.oona_consumer_name:
            async with self._role_client("service"):
                ctx.started()
                await ctx.wait_stopping()
            return
        lease_redis = connect(self.redis_url, StreamConfig(instance=INSTANCE_SERVICE))
        try:
            token = instance_token(self.settings.var_dir / "instance-token")
            keys = KeySpace(hash_tag_for(self.settings.redis_url))
            lease = InstanceLease(lease_redis, INSTANCE_SERVICE, token, keys=keys)
            self.instance = await lease.acquire()
            async with self._role_client("service"):
                try:
                    await lease.run(ctx)
                finally:
                    if ctx.stopping.is_set():
                        await lease.release()
        finally:
            await lease_redis.aclose()

    async def _run_library(self, ctx: WorkerContext) -> None:
        registry = self.attempt_metrics.fresh("urza_library")
        library = await asyncio.to_thread(UrzaLibrary.from_settings, self.settings, registry=registry)
        self.library = library
        try:
            ctx.started()
            await ctx.wait_stopping()
        finally:
            if self.library is library:
                self.library = None
            await asyncio.to_thread(library.close)

    # -- bus workers ---------------------------------------------------------------

    async def _run_prefetch(self, ctx: WorkerContext) -> None:
        async with self._role_client("prefetch") as client:
            registry = self.attempt_metrics.fresh("urza_prefetch")
            self.prefetch = UrzaPrefetchWorker(client, self._need_library(), registry=registry)
            await self.prefetch.run(ctx)

    async def _run_warmer(self, ctx: WorkerContext) -> None:
        async with self._role_client("kasmina") as client:
            self.warmer = self._warmer(client, self._need_library())
            await self.warmer.run(ctx)

    def _warmer(self, client: OonaClient, library: UrzaLibrary) -> KernelWarmer:
        return KernelWarmer(client, library)

    async def _run_tamiyo(self, ctx: WorkerContext) -> None:
        async with self._role_client("tamiyo") as client:
            metadata = UrzaBlueprintMetadata(self._need_library())
            controller = await asyncio.to_thread(
                TamiyoController.from_settings, self.settings, self.keyring, metadata
            )
            self.tamiyo = TamiyoService(client, controller)
            await self.tamiyo.run(ctx)

    async def _run_emergency(self, ctx: WorkerContext) -> None:
        async with self._role_client("emergency") as client:
            subscription = client.subscribe(
                client.config.emergency_stream, EMERGENCY_GROUP, self._on_emergency, types=_ALL_TYPES
            )
            await subscription.run(ctx)

    async def _on_emergency(self, message: OonaMessage) -> None:
        kind = leyline_pb2.BusMessageType.Name(message.message_type).removeprefix("BUS_MESSAGE_TYPE_").lower()
        self.emergencies[kind] += 1
        detail: dict[str, Any] = {"type": kind, "source": message.attributes.get("source", "")}
        if message.message_type == leyline_pb2.BUS_MESSAGE_TYPE_TELEMETRY:
            packet = message.decode(leyline_pb2.TelemetryPacket)
            detail.update(
                packet_source=packet.source_subsystem,
                health=leyline_pb2.HealthStatus.Name(packet.system_health.status),
                summary=packet.system_health.summary,
                events=[e.description for e in packet.events][:10],
            )
        _log.warning("weatherlight.emergency_message", **detail)

    # -- periodic work -------------------------------------------------------------

    def breaker_states(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for client in list(self.clients.values()):
            states[client.publish_breaker.name] = int(client.publish_breaker.state)
            states[client.consume_breaker.name] = int(client.consume_breaker.state)
        return states

    def component_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        service = self.clients.get("service")
        if service is not None:
            metrics.update({f"oona.{k}": v for k, v in service.metrics_snapshot().items()})
        if self.library is not None:
            for key, value in self.library.metrics_snapshot().items():
                if isinstance(value, int | float):
                    metrics[f"urza.library.{key}"] = float(value)
        if self.prefetch is not None:
            metrics.update({f"urza.{k}": v for k, v in self.prefetch.metrics_snapshot().items()})
        if self.warmer is not None:
            metrics.update(self.warmer.metrics_snapshot())
        if self.tamiyo is not None:
            metrics.update(
                {f"tamiyo.service.{k}": float(v) for k, v in self.tamiyo.metrics_snapshot().items()}
            )
        metrics.update({f"weatherlight.emergency.{k}": float(v) for k, v in self.emergencies.items()})
        metrics["weatherlight.housekeeping.skipped_total"] = float(self.housekeeping_skipped)
        return metrics

    async def publish_telemetry(self, ctx: WorkerContext | None = None) -> None:
        """Publish the service packet and Oona's, then forward Kasmina's at their own priority."""
        client = self.clients.get("service")
        if client is None:
            _log.warning("weatherlight.telemetry_skipped", reason="oona is not connected")
            return
        health = await self.health()
        packet = build_weatherlight_packet(
            self.supervisor.snapshot(),
            health,
            breaker_states=self.breaker_states(),
            extra_metrics=self.component_metrics(),
        )
        # Only a required path down is urgent (emergency stream); degraded is routine.
        urgent = health.status == UNHEALTHY
        priority = leyline_pb2.MESSAGE_PRIORITY_HIGH if urgent else leyline_pb2.MESSAGE_PRIORITY_NORMAL
        # Every packet names this replica, so Nissa keeps the replicas' series apart.
        instance = client.config.instance
        results = [
            await client.publish_telemetry(stamp_instance(packet, instance), priority=priority),
            await client.publish_telemetry(stamp_instance(client.metrics_packet(), instance)),
        ]
        if self.warmer is not None:
            for forwarded in self.warmer.drain_telemetry():
                results.append(
                    await client.publish_telemetry(
                        stamp_instance(forwarded, instance), priority=indicated_priority(forwarded)
                    )
                )
        failed = [r.reason for r in results if not r.ok]
        if failed:
            _log.warning(
                "weatherlight.telemetry_not_published", count=len(failed), reasons=sorted(set(failed))
            )

    async def housekeeping(self, ctx: WorkerContext | None = None) -> None:
        """Trim streams, refresh queue depths and, now and then, sweep Urza.

        A Redis outage is not this worker's failure: ``/readyz`` and the
        breakers report it, and trimming can wait for the next tick. Failing
        here would restart (and eventually fail) a required worker over
        something it cannot fix.
        """
        client = self.clients.get("service")
        try:
            if client is None:
                raise ConnectionError("oona is not connected")
            report = await client.housekeeping()
        except (RedisError, OSError) as exc:
            self.housekeeping_skipped += 1
            _log.warning("weatherlight.housekeeping_skipped", error=type(exc).__name__)
        else:
            trimmed = {stream: n for stream, n in report.trimmed.items() if n}
            if trimmed or report.consumers_removed:
                _log.info("weatherlight.trimmed", consumers_removed=report.consumers_removed, **trimmed)
        if ctx is not None:
            ctx.progress()
        self._ticks += 1
        if self.library is not None and self._ticks % self.maintenance_every == 0:
            swept = await self.library.amaintenance()
            _log.info("weatherlight.urza_maintenance", report=str(swept))

    # -- health and status ---------------------------------------------------------

    async def health(self) -> Health:
        """The one verdict for ``/readyz``, telemetry and the systemd watchdog (see ``health.py``)."""
        service = self.clients.get("service")
        redis, catalog = await asyncio.gather(
            probe_redis(service.redis if service is not None else None), probe_catalog(self.library)
        )
        health = judge(
            self.supervisor.snapshot(),
            redis=redis,
            catalog=catalog,
            bus=bus_problems(self.clients),
            breakers=self.breaker_states(),
        )
        self.last_health = health
        return health

    async def _readiness(self) -> Sequence[tuple[str, bool, str]]:
        return [(c.name, c.ok, c.detail) for c in (await self.health()).checks]

    async def _serving(self) -> bool:
        return (await self.health()).status != UNHEALTHY

    def status(self) -> Mapping[str, Any]:
        snapshot = dict(self.supervisor.snapshot())
        snapshot["instance"] = self.instance
        snapshot["health"] = self.last_health.view() if self.last_health is not None else None
        snapshot["breakers"] = self.breaker_states()
        snapshot["redis"] = "external" if self.settings.redis_url is not None else "embedded"
        snapshot["components"] = self.component_metrics()
        snapshot["tamiyo"] = {
            "policy_version": self.tamiyo.controller.policy_version if self.tamiyo is not None else None
        }
        return snapshot

    # -- lifecycle -------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        self.supervisor.request_stop(reason)

    async def run(self) -> ShutdownResult:
        """Boot, serve until asked to stop (or a required worker fails), then drain."""
        try:
            try:
                await self.start()
            except BootError as exc:
                return self.supervisor.result or ShutdownResult(False, False, boot_error=str(exc))
            reason = await self.supervisor.wait()
            _log.info("weatherlight.stopping", reason=reason)
            self.notifier.stopping()
            return await self.supervisor.shutdown(self.settings.weatherlight_shutdown_timeout_s)
        finally:
            self.close()

    async def start(self) -> None:
        """Take the var dir's lock, then boot (for embedding and tests); pair with ``stop()``.

        Raises ``AlreadyRunning`` when another service holds the var dir.
        """
        self.lock.acquire()
        try:
            if self.settings.redis_url is None:
                bulk = StreamConfig(instance="-").max_payload_bytes + _ENVELOPE_MARGIN_BYTES
                self.embedded_options = embedded_options(self.settings.var_dir, max_bulk_bytes=bulk)
            await self.supervisor.start(self.specs())
        except BaseException:
            self.close()
            raise
        self.notifier.ready(status="ready")

    async def stop(self) -> ShutdownResult:
        self.notifier.stopping()
        try:
            return await self.supervisor.shutdown(self.settings.weatherlight_shutdown_timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        """Release the var dir (every worker has closed what it opened by now)."""
        self.lock.release()
