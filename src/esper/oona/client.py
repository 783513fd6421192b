"""``OonaClient``: signed publishing, subscriptions, broadcast readers, housekeeping, health.

One client per component is the intended use; it owns one connection pool
(:mod:`esper.oona.connection`), a publish and a consume breaker, and the
health board its readers report to. Readers are created from it
(``subscribe``, ``broadcast``) and run as workers: ``await reader.run(ctx)``.

The publish hot path is one XADD with an approximate MAXLEN cap, so a
stream's memory stays bounded even while a reader lags: no XLEN, and pending
depth for backpressure is read only for streams that have a threshold, at
most once per ``depth_refresh_ms``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import ReadOnlyError, ResponseError

from esper.core.breaker import OPEN, CircuitBreaker
from esper.core.errors import ConfigError
from esper.core.logs import get_logger
from esper.core.settings import EsperSettings
from esper.leyline import leyline_pb2
from esper.oona import envelope
from esper.oona.broadcast import BroadcastReader
from esper.oona.config import DeliveryPolicy, StreamConfig
from esper.oona.connection import connect
from esper.oona.housekeeping import Housekeeper, HousekeepingReport
from esper.oona.keys import KeySpace
from esper.oona.link import REDIS_FAILURES, Link, honour_cancellation
from esper.oona.messages import Handler, PublishResult, Serializable
from esper.oona.metrics import OonaMetrics
from esper.oona.subscription import Subscription
from esper.security.signing import KeyRing

_log = get_logger("esper.oona")
_T = leyline_pb2


class OonaClient:
    """Signed, loss-free bus client on Redis Streams.

    ``redis`` is a URL (the client then owns its pool) or an existing
    ``redis.asyncio.Redis`` created with ``decode_responses=False``. A
    ``KeyRing`` is mandatory: nothing is ever published unsigned.
    """

    def __init__(
        self,
        redis: aioredis.Redis | str,
        config: StreamConfig,
        keyring: KeyRing,
        *,
        registry: CollectorRegistry | None = None,
        metrics: OonaMetrics | None = None,
        name: str = "",
    ) -> None:
        if not isinstance(keyring, KeyRing):
            raise TypeError("OonaClient needs a KeyRing: the bus never carries unsigned messages")
        self._owns_redis = isinstance(redis, str)
        client = connect(redis, config) if isinstance(redis, str) else redis
        # Several clients of one process (one per role) may share one metrics object, so
        # /metrics has one family per counter; ``name`` then tells their breakers apart.
        shared = metrics if metrics is not None else OonaMetrics(registry)
        prefix = f"{name}." if name else ""
        self.name = name
        self.link = Link(
            redis=client,
            config=config,
            keyring=keyring,
            metrics=shared,
            publish_breaker=self._breaker(f"{prefix}publish", config, shared),
            consume_breaker=self._breaker(f"{prefix}consume", config, shared),
            keys=KeySpace(config.hash_tag),
        )
        self._depths: dict[str, tuple[float, int]] = {}
        self._housekeeper: Housekeeper | None = None

    @classmethod
    def from_settings(
        cls,
        settings: EsperSettings,
        *,
        instance: str,
        redis_url: str | None = None,
        registry: CollectorRegistry | None = None,
        metrics: OonaMetrics | None = None,
        name: str = "",
        **overrides: Any,
    ) -> OonaClient:
        """A client for a service: REDIS_URL (or ``redis_url``), stream names and secrets from settings.

        Raises ``ConfigError`` when the secret or the URL is missing.
        """
        url = redis_url or settings.redis_url
        if not url:
            raise ConfigError(["REDIS_URL is not set"])
        config = StreamConfig.from_settings(settings, instance=instance, **overrides)
        return cls(
            url, config, KeyRing(*settings.signing_secrets()), registry=registry, metrics=metrics, name=name
        )

    @staticmethod
    def _breaker(name: str, c: StreamConfig, metrics: OonaMetrics) -> CircuitBreaker:
        breaker = CircuitBreaker(
            name,
            failure_threshold=c.breaker_failure_threshold,
            success_threshold=c.breaker_success_threshold,
            open_s=c.breaker_open_ms / 1000,
            open_max_s=c.breaker_open_max_ms / 1000,
            on_change=metrics.set_breaker,
        )
        metrics.set_breaker(name, int(breaker.state))
        return breaker

    # -- the parts, for callers that need them ------------------------------------------

    @property
    def config(self) -> StreamConfig:
        return self.link.config

    @property
    def redis(self) -> aioredis.Redis:
        return self.link.redis

    @property
    def keyring(self) -> KeyRing:
        return self.link.keyring

    @property
    def metrics(self) -> OonaMetrics:
        return self.link.metrics

    @property
    def keys(self) -> KeySpace:
        return self.link.keys

    @property
    def publish_breaker(self) -> CircuitBreaker:
        return self.link.publish_breaker

    @property
    def consume_breaker(self) -> CircuitBreaker:
        return self.link.consume_breaker

    async def aclose(self) -> None:
        if self._owns_redis:
            await self.link.redis.aclose()

    async def __aenter__(self) -> OonaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        message_type: leyline_pb2.BusMessageType.ValueType,
        message: Serializable | bytes,
        *,
        priority: leyline_pb2.MessagePriority.ValueType | None = None,
        stream: str | None = None,
    ) -> PublishResult:
        """Sign and XADD one message to its stream (by type and priority, or ``stream``).

        Refusals come back as a ``PublishResult``, never as an exception. With
        the publish breaker open this waits until it half-opens (capped by
        ``publish_breaker_wait_ms`` when set), so a retry loop cannot spin.
        """
        c, breaker, metrics = self.link.config, self.link.publish_breaker, self.link.metrics
        target = stream or c.route(message_type, priority)
        if breaker.state == OPEN:
            max_wait = None if c.publish_breaker_wait_ms is None else c.publish_breaker_wait_ms / 1000
            if not await breaker.wait_ready(max_wait):
                metrics.on_publish_failed(target, "breaker_open")
                return PublishResult(False, target, reason="breaker_open")
        threshold = c.backpressure.get(target)
        if threshold is not None:
            depth = await self._pending_depth(target)
            if depth is not None and depth >= threshold:
                metrics.on_publish_failed(target, "backpressure")
                _log.warning("oona.backpressure", stream=target, pending=depth, threshold=threshold)
                return PublishResult(False, target, reason="backpressure")
        body = message if isinstance(message, bytes) else message.SerializeToString(deterministic=True)
        payload = envelope.build_envelope(message_type, body, source=c.source)
        if len(payload) > c.max_payload_bytes:
            metrics.on_publish_failed(target, "oversized")
            return PublishResult(False, target, reason="oversized")
        fields = envelope.signed_fields(self.link.keyring, payload)
        started = time.perf_counter()
        try:
            entry_id = await self.link.redis.xadd(
                self.link.keys.stream(target),
                fields,  # type: ignore[arg-type]
                maxlen=c.cap,
                approximate=True,
            )
        except REDIS_FAILURES as exc:
            honour_cancellation()
            breaker.record_failure()
            metrics.on_publish_failed(target, "redis_error")
            _log.warning("oona.publish_failed", stream=target, error=f"{type(exc).__name__}: {exc}"[:200])
            return PublishResult(False, target, reason="redis_error")
        breaker.record_success()
        metrics.on_published(target, time.perf_counter() - started)
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return PublishResult(True, target, entry_id=text)

    async def publish_state(
        self, packet: leyline_pb2.SystemStatePacket, *, emergency: bool = False
    ) -> PublishResult:
        priority = _T.MESSAGE_PRIORITY_HIGH if emergency else None
        return await self.publish(_T.BUS_MESSAGE_TYPE_SYSTEM_STATE, packet, priority=priority)

    async def publish_command(self, command: leyline_pb2.AdaptationCommand) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, command)

    async def publish_field_report(self, report: leyline_pb2.FieldReport) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_FIELD_REPORT, report)

    async def publish_telemetry(
        self,
        packet: leyline_pb2.TelemetryPacket,
        priority: leyline_pb2.MessagePriority.ValueType | None = None,
    ) -> PublishResult:
        """HIGH/CRITICAL go to the emergency stream; this choice is per message only."""
        return await self.publish(_T.BUS_MESSAGE_TYPE_TELEMETRY, packet, priority=priority)

    async def publish_policy_update(self, update: leyline_pb2.PolicyUpdate) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_POLICY_UPDATE, update)

    async def publish_kernel_prefetch_request(
        self, request: leyline_pb2.KernelPrefetchRequest
    ) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST, request)

    async def publish_kernel_artifact_ready(self, ready: leyline_pb2.KernelArtifactReady) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, ready)

    async def publish_kernel_artifact_error(self, error: leyline_pb2.KernelArtifactError) -> PublishResult:
        return await self.publish(_T.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR, error)

    async def publish_kernel_catalog_update(self, update: leyline_pb2.KernelCatalogUpdate) -> PublishResult:
        """Shares the ready stream as in v1; readers must declare both types they accept."""
        return await self.publish(_T.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE, update)

    async def _pending_depth(self, stream: str) -> int | None:
        """Most un-acked entries of any group of ``stream``; cached for ``depth_refresh_ms``."""
        cached = self._depths.get(stream)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.link.config.depth_refresh_ms / 1000:
            return cached[1]
        try:
            groups: Any = await self.link.redis.xinfo_groups(self.link.keys.stream(stream))
            depth = max((int(g.get("pending") or 0) for g in groups), default=0)
        except ResponseError:
            depth = 0  # no stream or no group yet: nothing is pending
        except REDIS_FAILURES:
            honour_cancellation()
            return cached[1] if cached else None
        self._depths[stream] = (now, depth)
        return depth

    # -- readers ---------------------------------------------------------------------------

    def subscribe(
        self,
        stream: str,
        group: str,
        handler: Handler,
        *,
        types: Collection[int],
        ignore_types: Collection[int] = (),
        policy: DeliveryPolicy | None = None,
        on_committed: Callable[[list[str]], None] | None = None,
    ) -> Subscription:
        """Consume ``stream`` in ``group``: one replica handles each entry; replies commit with its ack.

        ``ignore_types`` are other types that legitimately share the stream
        (e.g. commands on ``oona.normal`` for a reader of system states):
        verified, acknowledged and counted as ignored, not dead-lettered.
        ``on_committed`` is called with the entry ids of every commit.
        """
        return Subscription(
            self.link,
            stream,
            group,
            handler,
            types=types,
            ignore_types=ignore_types,
            policy=policy,
            on_committed=on_committed,
        )

    def broadcast(
        self,
        stream: str,
        handler: Handler,
        *,
        types: Collection[int],
        ignore_types: Collection[int] = (),
        start_id: str = "$",
        batch: int = 64,
        linger_ms: int = 0,
    ) -> BroadcastReader:
        """A reader that sees every entry of ``stream``, independent of groups and other readers.

        ``linger_ms`` (for readers that need no low latency): once caught up,
        wait that long before reading again, so a busy stream wakes the reader
        at most that often and each read takes what gathered meanwhile.
        """
        return BroadcastReader(
            self.link,
            stream,
            handler,
            types=types,
            ignore_types=ignore_types,
            start_id=start_id,
            batch=batch,
            linger_ms=linger_ms,
        )

    # -- housekeeping and health -----------------------------------------------------------

    async def housekeeping(self) -> HousekeepingReport:
        """Trim, count what was lost unread, remove dead consumers, refresh pending gauges."""
        if self._housekeeper is None:
            self._housekeeper = Housekeeper(self.link)
        return await self._housekeeper.run_once()

    def problems(self) -> list[str]:
        """What currently keeps this client's paths from working (empty when all is well)."""
        found = list(self.link.health.problems())
        for breaker in (self.link.publish_breaker, self.link.consume_breaker):
            if breaker.state == OPEN:
                found.append(f"{breaker.name} breaker open")
        return found

    async def probe(self, timeout_s: float = 1.0) -> str | None:
        """A write round trip to the server: None when it accepts writes, else what is wrong.

        A read-only replica (a demoted primary), a server out of memory and an
        unreachable one all fail it, which a ping would not show.
        """
        key = self.link.keys.probe(self.link.config.instance)
        try:
            async with asyncio.timeout(timeout_s):
                await self.link.redis.set(key, b"1", px=5_000)
        except ReadOnlyError:
            return "read-only (a replica): writes are refused"
        except ResponseError as exc:
            word = str(exc).split(" ", 1)[0] or type(exc).__name__
            return f"refuses writes ({word})"
        except REDIS_FAILURES as exc:
            honour_cancellation()
            return f"unreachable ({type(exc).__name__})"
        return None

    def metrics_snapshot(self) -> dict[str, float]:
        snap = self.link.metrics.snapshot()
        for breaker in (self.link.publish_breaker, self.link.consume_breaker):
            snap[f"breaker.{breaker.name}.state"] = float(breaker.state)
        return snap

    def metrics_packet(self) -> leyline_pb2.TelemetryPacket:
        """Snapshot as a TelemetryPacket (source ``oona``), ready for ``publish_telemetry``."""
        for breaker in (self.link.publish_breaker, self.link.consume_breaker):
            self.link.metrics.set_breaker(breaker.name, int(breaker.state))
        return self.link.metrics.packet("oona")
