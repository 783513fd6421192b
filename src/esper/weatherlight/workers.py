"""The bodies of the control plane's workers: the bus server, Oona, Urza, Kasmina, Tamiyo, emergencies.

Why each body builds what it runs: a restart must start clean, so every
attempt opens its own Oona client (own connections and breakers), its own
components and their metrics registry, and closes them when it ends; nothing
of a failed attempt is reused. What an attempt built is published on
:class:`~esper.weatherlight.components.LiveComponents` for the readers. All
clients share one metrics object on the service registry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from esper.core.logs import get_logger
from esper.core.redis_server import RedisServer, ServerOptions, embedded_options
from esper.core.settings import EsperSettings
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
from esper.weatherlight.components import LiveComponents
from esper.weatherlight.metrics import AttemptRegistries

_log = get_logger("esper.weatherlight")
#: Instance names of control-plane replicas are ``weatherlight-<n>``.
INSTANCE_SERVICE = "weatherlight"
_ALL_TYPES = frozenset(v for v in leyline_pb2.BusMessageType.values() if v)
#: The group that reads the emergency stream (every other group belongs to its component).
EMERGENCY_GROUP = "weatherlight-emergency"
#: Room for the signed envelope around Oona's largest payload, for the server's bulk limit.
_ENVELOPE_MARGIN_BYTES = 64 * 1024


class ControlPlaneWorkers:
    """One ``run(ctx)`` per control-plane worker, sharing settings, keys, metrics and ``live``.

    ``bus_overrides`` tune every role's ``StreamConfig`` (tests shorten
    breaker windows with it).
    """

    def __init__(
        self,
        settings: EsperSettings,
        keyring: KeyRing,
        live: LiveComponents,
        *,
        oona_metrics: OonaMetrics,
        attempt_metrics: AttemptRegistries,
        bus_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.keyring = keyring
        self.live = live
        self.oona_metrics = oona_metrics
        self.attempt_metrics = attempt_metrics
        self.bus_overrides = dict(bus_overrides or {})
        #: The embedded server's options (set by ``set_up_embedded`` when ``REDIS_URL`` is unset) and process.
        self.embedded_options: ServerOptions | None = None
        self.embedded: RedisServer | None = None

    # -- where the bus is ------------------------------------------------------------

    def set_up_embedded(self) -> None:
        """Without ``REDIS_URL``: choose (or reuse from the var dir) the private server's port, password."""
        if self.settings.redis_url is None:
            bulk = StreamConfig(instance="-").max_payload_bytes + _ENVELOPE_MARGIN_BYTES
            self.embedded_options = embedded_options(self.settings.var_dir, max_bulk_bytes=bulk)

    @property
    def redis_url(self) -> str:
        if self.settings.redis_url is not None:
            return self.settings.redis_url
        if self.embedded_options is None:
            raise RuntimeError("the embedded server is set up when the service starts")
        return self.embedded_options.url

    def config(self, role: str) -> StreamConfig:
        if self.live.instance is None:
            raise RuntimeError("the instance name is leased by the oona step")
        config = StreamConfig.from_settings(self.settings, instance=self.live.instance)
        if role == "service":
            # Telemetry must never stall its worker waiting for a breaker.
            config = replace(config, publish_breaker_wait_ms=100)
        return replace(config, **self.bus_overrides) if self.bus_overrides else config

    @asynccontextmanager
    async def role_client(self, role: str) -> AsyncIterator[OonaClient]:
        """A fresh client for one attempt of a role's worker, visible to health and metrics meanwhile."""
        client = OonaClient(
            self.redis_url, self.config(role), self.keyring, metrics=self.oona_metrics, name=role
        )
        clients = self.live.clients
        clients[role] = client
        try:
            yield client
        finally:
            if clients.get(role) is client:
                del clients[role]
            await client.aclose()

    # -- resource workers ----------------------------------------------------------

    async def run_embedded(self, ctx: WorkerContext) -> None:
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

    async def run_oona(self, ctx: WorkerContext) -> None:
        """Lease this replica's instance name, then hold the service's own client until the end.

        The lease's token lives in the var dir, so a restart of this replica
        (even after kill -9) gets its name back and resumes its own pending
        entries at once; the lease is renewed while the service runs.
        """
        if self.settings.oona_consumer_name:
            async with self.role_client("service"):
                ctx.started()
                await ctx.wait_stopping()
            return
        lease_redis = connect(self.redis_url, StreamConfig(instance=INSTANCE_SERVICE))
        try:
            token = instance_token(self.settings.var_dir / "instance-token")
            keys = KeySpace(hash_tag_for(self.settings.redis_url))
            lease = InstanceLease(lease_redis, INSTANCE_SERVICE, token, keys=keys)
            self.live.instance = await lease.acquire()
            async with self.role_client("service"):
                try:
                    await lease.run(ctx)
                finally:
                    if ctx.stopping.is_set():
                        await lease.release()
        finally:
            await lease_redis.aclose()

    async def run_library(self, ctx: WorkerContext) -> None:
        registry = self.attempt_metrics.fresh("urza_library")
        library = await asyncio.to_thread(UrzaLibrary.from_settings, self.settings, registry=registry)
        self.live.library = library
        try:
            ctx.started()
            await ctx.wait_stopping()
        finally:
            if self.live.library is library:
                self.live.library = None
            await asyncio.to_thread(library.close)

    # -- bus workers ---------------------------------------------------------------

    async def run_prefetch(self, ctx: WorkerContext) -> None:
        async with self.role_client("prefetch") as client:
            registry = self.attempt_metrics.fresh("urza_prefetch")
            prefetch = UrzaPrefetchWorker(client, self.live.need_library(), registry=registry)
            self.live.prefetch = prefetch
            await prefetch.run(ctx)

    async def run_warmer(self, ctx: WorkerContext) -> None:
        async with self.role_client("kasmina") as client:
            warmer = KernelWarmer(client, self.live.need_library())
            self.live.warmer = warmer
            await warmer.run(ctx)

    async def run_tamiyo(self, ctx: WorkerContext) -> None:
        async with self.role_client("tamiyo") as client:
            metadata = UrzaBlueprintMetadata(self.live.need_library())
            controller = await asyncio.to_thread(
                TamiyoController.from_settings, self.settings, self.keyring, metadata
            )
            tamiyo = TamiyoService(client, controller)
            self.live.tamiyo = tamiyo
            await tamiyo.run(ctx)

    async def run_emergency(self, ctx: WorkerContext) -> None:
        async with self.role_client("emergency") as client:
            subscription = client.subscribe(
                client.config.emergency_stream, EMERGENCY_GROUP, self.on_emergency, types=_ALL_TYPES
            )
            await subscription.run(ctx)

    async def on_emergency(self, message: OonaMessage) -> None:
        kind = leyline_pb2.BusMessageType.Name(message.message_type).removeprefix("BUS_MESSAGE_TYPE_").lower()
        self.live.emergencies[kind] += 1
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
