"""Weatherlight: boots the control plane in order and supervises it.

Boot order (each step gates the next; see ``WeatherlightService.specs``):
HTTP probes → embedded Redis (only without ``REDIS_URL``) → Oona consumer
groups → Urza library → Urza prefetch worker → Kasmina kernel warmer →
Tamiyo (system states and policy updates) → emergency-stream consumer →
telemetry → housekeeping. Shutdown runs in reverse, so the HTTP server
reports "not ready" for the whole drain and the embedded server stops after
every client of it. Each role has its own Oona client (its own breakers and
connections) while all share one metrics object on the service registry.
"""

from __future__ import annotations

import asyncio
from collections import Counter as Tally
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from esper.core.http_server import HealthServer
from esper.core.logs import get_logger
from esper.core.settings import EsperSettings
from esper.core.telemetry import indicated_priority
from esper.kasmina.warmer import KernelWarmer
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, OonaMetrics, StreamConfig
from esper.security import KeyRing
from esper.tamiyo import TamiyoController
from esper.tamiyo.metadata import UrzaBlueprintMetadata
from esper.tamiyo.service import TamiyoService
from esper.urza import UrzaLibrary
from esper.urza.prefetch import UrzaPrefetchWorker
from esper.weatherlight.embedded_redis import EmbeddedRedis
from esper.weatherlight.sdnotify import SdNotifier
from esper.weatherlight.supervisor import (
    BackoffPolicy,
    BootError,
    RestartPolicy,
    ShutdownResult,
    Supervisor,
    WorkerContext,
    WorkerSpec,
)
from esper.weatherlight.telemetry import build_weatherlight_packet
from esper.weatherlight.workers import run_components, run_once, run_periodically

_log = get_logger("esper.weatherlight")
_CONSUMER_HEARTBEAT_S = 60.0
_ALL_TYPES = frozenset(v for v in leyline_pb2.BusMessageType.values() if v)
_ROLES = {"prefetch": "weatherlight", "kasmina": "kasmina", "tamiyo": "tamiyo", "service": "weatherlight"}


class WeatherlightService:
    """The composed control plane. ``await run()`` returns a ``ShutdownResult``."""

    def __init__(
        self,
        settings: EsperSettings,
        *,
        backoff: BackoffPolicy | None = None,
        housekeeping_interval_s: float = 60.0,
        maintenance_every: int = 10,
        notifier: SdNotifier | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = KeyRing(*settings.signing_secrets())
        self.registry = registry if registry is not None else CollectorRegistry()
        self.oona_metrics = OonaMetrics(self.registry)
        self.supervisor = Supervisor(backoff)
        self.notifier = notifier or SdNotifier()
        self.housekeeping_interval_s = housekeeping_interval_s
        self.maintenance_every = max(1, maintenance_every)
        self.http = HealthServer(
            settings.weatherlight_http_host,
            settings.weatherlight_http_port,
            registry=self.registry,
            status=self.status,
        )
        self.http.add_check("workers", self.supervisor.readiness_check)
        self.http.add_check("redis", self._redis_check)
        self.http.add_check("catalog", self._catalog_check)
        self.embedded = EmbeddedRedis(settings.var_dir) if settings.redis_url is None else None
        self.clients: dict[str, OonaClient] = {}
        self.library: UrzaLibrary | None = None
        self.prefetch: UrzaPrefetchWorker | None = None
        self.warmer: KernelWarmer | None = None
        self.tamiyo: TamiyoService | None = None
        self.emergencies: Tally[str] = Tally()
        self.housekeeping_skipped = 0
        self._ticks = 0

    # -- composition ---------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        if self.embedded is not None:
            return self.embedded.url
        assert self.settings.redis_url is not None
        return self.settings.redis_url

    def specs(self) -> list[WorkerSpec]:
        """The workers in boot order."""
        specs = [WorkerSpec("http", lambda ctx: self.http.serve(ctx.stopping), grace_s=1.0)]
        if self.embedded is not None:
            specs.append(WorkerSpec("redis", self.embedded.run_worker, wait_ready=True, grace_s=5.0))
        consumer = {"heartbeat_timeout_s": _CONSUMER_HEARTBEAT_S, "wait_ready": True}
        specs += [
            WorkerSpec(
                "oona_groups",
                lambda ctx: run_once(ctx, self._connect_bus),
                restart=RestartPolicy.TRANSIENT,
                wait_ready=True,
            ),
            WorkerSpec(
                "urza_library",
                lambda ctx: run_once(ctx, self._open_library),
                restart=RestartPolicy.TRANSIENT,
                wait_ready=True,
            ),
            WorkerSpec("urza_prefetch", self._run_prefetch, **consumer),  # type: ignore[arg-type]
            WorkerSpec("kasmina", self._run_warmer, **consumer),  # type: ignore[arg-type]
            WorkerSpec("tamiyo", self._run_tamiyo, **consumer),  # type: ignore[arg-type]
            WorkerSpec("emergency", self._run_emergency, **consumer),  # type: ignore[arg-type]
            WorkerSpec(
                "telemetry",
                lambda ctx: run_periodically(
                    ctx, self.settings.weatherlight_telemetry_interval_s, self.publish_telemetry
                ),
                heartbeat_timeout_s=max(30.0, 3 * self.settings.weatherlight_telemetry_interval_s),
            ),
            WorkerSpec(
                "housekeeping",
                lambda ctx: run_periodically(ctx, self.housekeeping_interval_s, self.housekeeping),
                heartbeat_timeout_s=max(120.0, 3 * self.housekeeping_interval_s),
            ),
        ]
        if self.notifier.enabled:
            specs.append(
                WorkerSpec(
                    "sd_watchdog", lambda ctx: self.notifier.run_watchdog(ctx.stopping), required=False
                )
            )
        return specs

    def _client(self, role: str) -> OonaClient:
        client = self.clients.get(role)
        if client is None:
            config = StreamConfig.from_settings(self.settings, group=_ROLES[role], consumer_prefix=role)
            if role == "service":
                # Telemetry must never stall its worker waiting for a breaker.
                config = replace(config, publish_breaker_wait_ms=100)
            client = OonaClient(self.redis_url, config, self.keyring, metrics=self.oona_metrics, name=role)
            self.clients[role] = client
        return client

    async def _connect_bus(self) -> None:
        for role in _ROLES:
            await self._client(role).ensure_consumer_groups()

    async def _open_library(self) -> None:
        if self.library is None:
            self.library = await asyncio.to_thread(
                UrzaLibrary.from_settings, self.settings, registry=self.registry
            )

    def _need_library(self) -> UrzaLibrary:
        if self.library is None:
            raise RuntimeError("the Urza library is not open")
        return self.library

    async def _run_prefetch(self, ctx: WorkerContext) -> None:
        if self.prefetch is None:
            self.prefetch = UrzaPrefetchWorker(
                self._client("prefetch"), self._need_library(), registry=self.registry
            )
        await run_components(ctx, [self.prefetch], progress=[self.prefetch.consumer])

    async def _run_warmer(self, ctx: WorkerContext) -> None:
        if self.warmer is None:
            self.warmer = KernelWarmer(self._client("kasmina"), self._need_library())
        consumers = [self.warmer.commands, self.warmer.catalog]
        await run_components(ctx, consumers, progress=consumers)

    async def _run_tamiyo(self, ctx: WorkerContext) -> None:
        if self.tamiyo is None:
            metadata = UrzaBlueprintMetadata(self._need_library())
            controller = await asyncio.to_thread(
                TamiyoController.from_settings, self.settings, self.keyring, metadata
            )
            self.tamiyo = TamiyoService(self._client("tamiyo"), controller)
        await run_components(ctx, [self.tamiyo], progress=self.tamiyo.consumers)

    async def _run_emergency(self, ctx: WorkerContext) -> None:
        client = self._client("service")
        consumer = client.consumer(client.config.emergency_stream, self._on_emergency, types=_ALL_TYPES)
        await run_components(ctx, [consumer], progress=[consumer])

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
        for client in self.clients.values():
            states[client.publish_breaker.name] = int(client.publish_breaker.state)
            states[client.consume_breaker.name] = int(client.consume_breaker.state)
        return states

    def component_metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.clients:
            first = next(iter(self.clients.values()))
            metrics.update({f"oona.{k}": v for k, v in first.metrics_snapshot().items()})
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

    async def publish_telemetry(self) -> None:
        """Publish the service packet and Oona's, then forward Kasmina's at their own priority."""
        client = self._client("service")
        snapshot = self.supervisor.snapshot()
        packet = build_weatherlight_packet(
            snapshot, breaker_states=self.breaker_states(), extra_metrics=self.component_metrics()
        )
        # A failed worker is urgent; backing off or an open breaker is only degraded.
        priority = (
            leyline_pb2.MESSAGE_PRIORITY_HIGH if snapshot["failed"] else leyline_pb2.MESSAGE_PRIORITY_NORMAL
        )
        results = [
            await client.publish_telemetry(packet, priority=priority),
            await client.publish_telemetry(client.metrics_packet()),
        ]
        if self.warmer is not None:
            for forwarded in self.warmer.drain_telemetry():
                results.append(
                    await client.publish_telemetry(forwarded, priority=indicated_priority(forwarded))
                )
        failed = [r.reason for r in results if not r.ok]
        if failed:
            _log.warning(
                "weatherlight.telemetry_not_published", count=len(failed), reasons=sorted(set(failed))
            )

    async def housekeeping(self) -> None:
        """Trim streams, refresh queue depths and, now and then, sweep Urza.

        A Redis outage is not this worker's failure: it is reported by
        ``/readyz`` and the consumers' breakers, and trimming can wait for the
        next tick. Failing here would restart (and eventually fail) a required
        worker over something it cannot fix.
        """
        client = self._client("service")
        try:
            trimmed = await client.housekeeping()
            await client.refresh_depths()
        except (RedisError, OSError) as exc:
            self.housekeeping_skipped += 1
            _log.warning("weatherlight.housekeeping_skipped", error=type(exc).__name__)
        else:
            if any(trimmed.values()):
                _log.info("weatherlight.trimmed", **{k: v for k, v in trimmed.items() if v})
        self._ticks += 1
        if self.library is not None and self._ticks % self.maintenance_every == 0:
            report = await self.library.amaintenance()
            _log.info("weatherlight.urza_maintenance", report=str(report))

    # -- probes and status ---------------------------------------------------------

    async def _redis_check(self) -> tuple[bool, str]:
        client = self.clients.get("service")
        if client is None:
            return False, "not connected yet"
        try:
            await asyncio.wait_for(client.redis.ping(), 1.0)
        except (OSError, TimeoutError) as exc:
            return False, f"unreachable ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - redis-py raises its own error types; all mean "down"
            return False, f"unreachable ({type(exc).__name__})"
        return True, "ok"

    async def _catalog_check(self) -> tuple[bool, str]:
        if self.library is None:
            return False, "not open yet"
        try:
            await self.library.aget("__readyz__")
        except Exception as exc:  # noqa: BLE001 - any database failure means "not ready"
            return False, f"unreachable ({type(exc).__name__})"
        return True, "ok"

    def status(self) -> Mapping[str, Any]:
        snapshot = dict(self.supervisor.snapshot())
        snapshot["breakers"] = self.breaker_states()
        snapshot["redis"] = "embedded" if self.embedded is not None else "external"
        snapshot["components"] = self.component_metrics()
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
            await self.close()

    async def start(self) -> None:
        """Boot only (for embedding and tests); pair with ``stop()``."""
        await self.supervisor.start(self.specs())
        self.notifier.ready(status="ready")

    async def stop(self) -> ShutdownResult:
        self.notifier.stopping()
        try:
            return await self.supervisor.shutdown(self.settings.weatherlight_shutdown_timeout_s)
        finally:
            await self.close()

    async def close(self) -> None:
        """Release clients and the library (Oona last of the components)."""
        if self.library is not None:
            await asyncio.to_thread(self.library.close)
        for client in self.clients.values():
            await client.aclose()
        self.clients.clear()
