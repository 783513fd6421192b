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

This module only composes and runs: the worker bodies live in
:mod:`~esper.weatherlight.workers` (each attempt builds what it runs, so a
restart starts clean), what they built in
:mod:`~esper.weatherlight.components`, health, ``/status`` and telemetry in
:mod:`~esper.weatherlight.reporting`, the periodic upkeep in
:mod:`~esper.weatherlight.housekeeping`. One service runs per var dir
(:class:`~esper.core.instance_lock.InstanceLock`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from esper.core.http_server import HealthServer
from esper.core.instance_lock import InstanceLock
from esper.core.logs import get_logger
from esper.core.settings import EsperSettings
from esper.oona import OonaMetrics
from esper.security import KeyRing
from esper.tamiyo.service import TamiyoService
from esper.weatherlight.components import LiveComponents
from esper.weatherlight.health import Health
from esper.weatherlight.housekeeping import Housekeeping
from esper.weatherlight.metrics import AttemptRegistries, SupervisorCollector
from esper.weatherlight.periodic import run_every
from esper.weatherlight.reporting import Reporting
from esper.weatherlight.sdnotify import SdNotifier
from esper.weatherlight.specs import BackoffPolicy, BootError, ShutdownResult, WorkerSpec
from esper.weatherlight.supervisor import Supervisor
from esper.weatherlight.workers import ControlPlaneWorkers

_log = get_logger("esper.weatherlight")
#: A consumer reads with at most a 5 s block, so an idle one progresses at least that often; a
#: minute of silence is a wedge.
CONSUMER_HEARTBEAT_S = 60.0


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
        self.registry = registry if registry is not None else CollectorRegistry()
        self.supervisor = Supervisor(backoff)
        self.notifier = notifier or SdNotifier()
        self.lock = InstanceLock(settings.var_dir)
        self.live = LiveComponents(settings.oona_consumer_name)
        attempt_metrics = AttemptRegistries()
        self.workers = ControlPlaneWorkers(
            settings,
            KeyRing(*settings.signing_secrets()),
            self.live,
            oona_metrics=OonaMetrics(self.registry),
            attempt_metrics=attempt_metrics,
            bus_overrides=bus_overrides,
        )
        self.reports = Reporting(settings, self.supervisor, self.live)
        self.upkeep = Housekeeping(self.live, maintenance_every=maintenance_every)
        self.registry.register(attempt_metrics)
        self.registry.register(SupervisorCollector(self.supervisor.snapshot, self.live.breaker_states))
        self.http = HealthServer(
            settings.weatherlight_http_host,
            settings.weatherlight_http_port,
            registry=self.registry,
            status=self.reports.status,
        )
        self.http.add_checks("health", self.reports.readiness, timeout_s=3.0)

    # -- what callers read -----------------------------------------------------------

    @property
    def instance(self) -> str | None:
        """This replica's consumer name in every group (``OONA_CONSUMER_NAME`` or a leased slot)."""
        return self.live.instance

    @property
    def tamiyo(self) -> TamiyoService | None:
        return self.live.tamiyo

    @property
    def housekeeping_skipped(self) -> int:
        return self.live.housekeeping_skipped

    async def health(self) -> Health:
        """The one verdict for ``/readyz``, telemetry and the systemd watchdog."""
        return await self.reports.health()

    def status(self) -> Mapping[str, Any]:
        return self.reports.status()

    async def housekeeping(self) -> None:
        """One housekeeping tick now (the worker runs them on its interval)."""
        await self.upkeep.tick()

    # -- composition ---------------------------------------------------------------

    def specs(self) -> list[WorkerSpec]:
        """The workers in boot order."""
        workers = self.workers
        interval = self.settings.weatherlight_telemetry_interval_s
        housekeeping = self.settings.weatherlight_housekeeping_interval_s
        consumer = {"heartbeat_timeout_s": CONSUMER_HEARTBEAT_S}
        # The HTTP port is a boot step that cannot fix itself: fail within a few seconds, naming it.
        specs = [WorkerSpec("http", self.http.run, grace_s=1.0, ready_timeout_s=5.0)]
        if self.settings.redis_url is None:
            specs.append(WorkerSpec("redis", workers.run_embedded, grace_s=5.0))
        specs += [
            WorkerSpec("oona", workers.run_oona),
            WorkerSpec("urza_library", workers.run_library),
            WorkerSpec("urza_prefetch", workers.run_prefetch, **consumer),  # type: ignore[arg-type]
            WorkerSpec("kasmina", workers.run_warmer, **consumer),  # type: ignore[arg-type]
            WorkerSpec("tamiyo", workers.run_tamiyo, **consumer),  # type: ignore[arg-type]
            WorkerSpec("emergency", workers.run_emergency, **consumer),  # type: ignore[arg-type]
            WorkerSpec(
                "telemetry",
                lambda ctx: run_every(ctx, interval, self.reports.publish_telemetry),
                heartbeat_timeout_s=max(30.0, 3 * interval),
            ),
            WorkerSpec(
                "housekeeping",
                lambda ctx: run_every(ctx, housekeeping, self.upkeep.tick),
                heartbeat_timeout_s=max(300.0, 3 * housekeeping),
            ),
        ]
        if self.notifier.watchdog_enabled:
            specs.append(
                WorkerSpec(
                    "sd_watchdog",
                    lambda ctx: self.notifier.run_watchdog(ctx, self.reports.serving),
                    required=False,
                )
            )
        return specs

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
        started = time.monotonic()
        try:
            self.workers.set_up_embedded()
            await self.supervisor.start(self.specs())
        except BaseException:
            self.close()
            raise
        self.notifier.ready(status="ready")
        _log.info(
            "weatherlight.ready",
            instance=self.live.instance,
            http_port=self.http.port,
            boot_s=round(time.monotonic() - started, 3),
        )

    async def stop(self) -> ShutdownResult:
        self.notifier.stopping()
        try:
            return await self.supervisor.shutdown(self.settings.weatherlight_shutdown_timeout_s)
        finally:
            self.close()

    def close(self) -> None:
        """Release the var dir (every worker has closed what it opened by now)."""
        self.lock.release()
