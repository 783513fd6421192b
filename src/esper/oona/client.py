"""``OonaClient``: signed publishing, consumer-group set-up, housekeeping, metrics.

One client per process component is the intended use; it owns one Redis
connection pool, two circuit breakers (publish and consume) and the metrics.
Consumers are created from it (``client.consumer(...)``/``client.broadcast(...)``)
and share its key ring, config and breakers.

The publish hot path is one XADD: no XLEN, and pending depth for
backpressure is read only for streams that have a threshold, at most once
per ``depth_refresh_ms``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Unpack

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from esper.core.logs import get_logger
from esper.core.settings import EsperSettings
from esper.leyline import leyline_pb2
from esper.oona import envelope
from esper.oona.breaker import OPEN, CircuitBreaker
from esper.oona.config import StreamConfig
from esper.oona.housekeeping import trim_streams
from esper.oona.messages import Handler, OonaMessage, PublishResult, RejectReason
from esper.oona.metrics import OonaMetrics
from esper.security.signing import KeyRing

if TYPE_CHECKING:
    from esper.oona.broadcast_consumer import BroadcastConsumer, BroadcastOptions
    from esper.oona.group_consumer import GroupConsumer, GroupOptions

_log = get_logger("esper.oona")
MT = leyline_pb2


class _Serializable(Protocol):
    def SerializeToString(self, *, deterministic: bool = ...) -> bytes: ...


def _priority_is_urgent(priority: leyline_pb2.MessagePriority.ValueType | None) -> bool:
    return priority in (leyline_pb2.MESSAGE_PRIORITY_HIGH, leyline_pb2.MESSAGE_PRIORITY_CRITICAL)


class OonaClient:
    """Signed, loss-free bus client on Redis Streams.

    ``redis`` is a URL (the client then owns the pool, with a socket timeout
    above the block time and no hidden command retries) or an existing
    ``redis.asyncio.Redis`` created with ``decode_responses=False``.
    A ``KeyRing`` is mandatory: nothing is ever published unsigned.
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
        self.config = config
        self.keyring = keyring
        if isinstance(redis, str):
            # A blocking pool makes bursts of concurrent publishes queue for a
            # connection instead of failing with "Too many connections".
            pool = aioredis.BlockingConnectionPool.from_url(
                redis,
                max_connections=config.max_connections,
                timeout=config.socket_timeout_s,
                decode_responses=False,
                socket_timeout=config.socket_timeout_s,
                socket_connect_timeout=5.0,
                retry=Retry(NoBackoff(), 0),
            )
            self.redis = aioredis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
            self._owns_redis = True
        else:
            self.redis = redis
            self._owns_redis = False
        # Several clients of one process (one per role, each with its own
        # breakers) may share one metrics object, so /metrics has one family
        # per counter; ``name`` then tells their breakers apart.
        self.metrics = metrics if metrics is not None else OonaMetrics(registry)
        self.name = name
        self._breaker_prefix = f"{name}." if name else ""
        self.publish_breaker = self._breaker(f"{self._breaker_prefix}publish", config.breaker_timeout_ms)
        self.consume_breaker = self._breaker(
            f"{self._breaker_prefix}consume", config.consume_breaker_timeout_ms or config.breaker_timeout_ms
        )
        self._depths: dict[str, tuple[float, int]] = {}

    @classmethod
    def from_settings(
        cls,
        settings: EsperSettings,
        *,
        group: str,
        consumer_prefix: str | None = None,
        registry: CollectorRegistry | None = None,
        metrics: OonaMetrics | None = None,
        name: str = "",
        **overrides: Any,
    ) -> OonaClient:
        """Client for a service: REDIS_URL, stream names and secrets from settings.

        Raises ``ConfigError`` when the secret or REDIS_URL is missing.
        """
        from esper.core.errors import ConfigError

        if not settings.redis_url:
            raise ConfigError(["REDIS_URL is not set"])
        config = StreamConfig.from_settings(
            settings, group=group, consumer_prefix=consumer_prefix, **overrides
        )
        return cls(
            settings.redis_url,
            config,
            KeyRing(*settings.signing_secrets()),
            registry=registry,
            metrics=metrics,
            name=name,
        )

    def _breaker(self, name: str, timeout_ms: int) -> CircuitBreaker:
        c = self.config
        breaker = CircuitBreaker(
            name,
            failure_threshold=c.breaker_failure_threshold,
            success_threshold=c.breaker_success_threshold,
            timeout_ms=timeout_ms,
            on_change=self.metrics.set_breaker,
        )
        self.metrics.set_breaker(name, int(breaker.state))
        return breaker

    async def aclose(self) -> None:
        if self._owns_redis:
            await self.redis.aclose()

    async def __aenter__(self) -> OonaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- groups --------------------------------------------------------------------

    async def ensure_consumer_groups(self, group: str | None = None) -> None:
        """Create ``group`` (default: the config's) on every stream, from id 0.

        Starting at 0 with MKSTREAM means a message published before the group
        existed is still delivered; an existing group (BUSYGROUP) is kept.
        """
        for stream in self.config.streams:
            await self.ensure_group(stream, group)

    async def ensure_group(self, stream: str, group: str | None = None) -> None:
        try:
            await self.redis.xgroup_create(stream, group or self.config.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        stream: str,
        message_type: leyline_pb2.BusMessageType.ValueType,
        message: _Serializable | bytes,
    ) -> PublishResult:
        """Sign and XADD one message; refusals come back as a ``PublishResult``.

        With the publish breaker open this waits until it half-opens (no
        instant refusals that a retry loop could spin on); the wait is capped
        by ``publish_breaker_wait_ms`` when set, after which ``breaker_open``
        is returned.
        """
        c = self.config
        breaker = self.publish_breaker
        if breaker.state == OPEN:
            max_wait = None if c.publish_breaker_wait_ms is None else c.publish_breaker_wait_ms / 1000
            if not await breaker.wait_ready(max_wait):
                self.metrics.on_publish_failed(stream, "breaker_open")
                return PublishResult(False, stream, reason="breaker_open")
        threshold = c.backpressure.get(stream)
        if threshold is not None:
            depth = await self._pending_depth(stream)
            if depth is not None and depth >= threshold:
                self.metrics.on_publish_failed(stream, "backpressure")
                _log.warning("oona.backpressure", stream=stream, pending=depth, threshold=threshold)
                return PublishResult(False, stream, reason="backpressure")
        body = message if isinstance(message, bytes) else message.SerializeToString(deterministic=True)
        fields = envelope.signed_fields(
            self.keyring, envelope.build_envelope(message_type, body, source=c.source)
        )
        started = time.perf_counter()
        try:
            entry_id = await self.redis.xadd(stream, fields)  # type: ignore[arg-type]
        except (RedisError, OSError) as exc:
            breaker.record_failure()
            self.metrics.on_publish_failed(stream, "redis_error")
            _log.warning("oona.publish_failed", stream=stream, error=type(exc).__name__)
            return PublishResult(False, stream, reason="redis_error")
        breaker.record_success()
        self.metrics.on_published(stream, time.perf_counter() - started)
        text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        return PublishResult(True, stream, entry_id=text)

    async def publish_state(
        self, packet: leyline_pb2.SystemStatePacket, *, emergency: bool = False
    ) -> PublishResult:
        stream = self.config.emergency_stream if emergency else self.config.normal_stream
        return await self.publish(stream, MT.BUS_MESSAGE_TYPE_SYSTEM_STATE, packet)

    async def publish_command(self, command: leyline_pb2.AdaptationCommand) -> PublishResult:
        return await self.publish(self.config.normal_stream, MT.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND, command)

    async def publish_field_report(self, report: leyline_pb2.FieldReport) -> PublishResult:
        return await self.publish(self.config.normal_stream, MT.BUS_MESSAGE_TYPE_FIELD_REPORT, report)

    async def publish_telemetry(
        self,
        packet: leyline_pb2.TelemetryPacket,
        priority: leyline_pb2.MessagePriority.ValueType | None = None,
    ) -> PublishResult:
        """HIGH/CRITICAL go to the emergency stream; this choice is per message only."""
        c = self.config
        stream = c.emergency_stream if _priority_is_urgent(priority) else c.telemetry_stream
        return await self.publish(stream, MT.BUS_MESSAGE_TYPE_TELEMETRY, packet)

    async def publish_policy_update(self, update: leyline_pb2.PolicyUpdate) -> PublishResult:
        return await self.publish(self.config.policy_stream, MT.BUS_MESSAGE_TYPE_POLICY_UPDATE, update)

    async def publish_kernel_prefetch_request(
        self, request: leyline_pb2.KernelPrefetchRequest
    ) -> PublishResult:
        return await self.publish(
            self.config.kernel_request_stream, MT.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST, request
        )

    async def publish_kernel_artifact_ready(self, ready: leyline_pb2.KernelArtifactReady) -> PublishResult:
        return await self.publish(
            self.config.kernel_ready_stream, MT.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, ready
        )

    async def publish_kernel_artifact_error(self, error: leyline_pb2.KernelArtifactError) -> PublishResult:
        return await self.publish(
            self.config.kernel_error_stream, MT.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR, error
        )

    async def publish_kernel_catalog_update(self, update: leyline_pb2.KernelCatalogUpdate) -> PublishResult:
        """Shares the ready stream as in v1; consumers must declare both types they accept."""
        return await self.publish(
            self.config.kernel_ready_stream, MT.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE, update
        )

    async def _pending_depth(self, stream: str) -> int | None:
        """Cached XPENDING count of the config group; refreshed at most every ``depth_refresh_ms``."""
        cached = self._depths.get(stream)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.config.depth_refresh_ms / 1000:
            return cached[1]
        try:
            summary = await self.redis.xpending(stream, self.config.group)
            depth = int(summary.get("pending") or 0)
        except ResponseError:
            depth = 0  # no group yet: nothing is pending
        except (RedisError, OSError):
            return cached[1] if cached else None
        self._depths[stream] = (now, depth)
        self.metrics.set_pending(stream, self.config.group, depth, primary=True)
        return depth

    # -- consumers -------------------------------------------------------------------

    def consumer(self, stream: str, handler: Handler, **options: Unpack[GroupOptions]) -> GroupConsumer:
        """A consumer-group reader: each entry is handled by one replica, acked on success.

        ``types`` are handed to ``handler``; ``ignore_types`` are other types
        that legitimately share the stream (e.g. commands on ``oona.normal``
        for a consumer of system states): they are verified, acked and
        counted as ignored instead of dead-lettered as unexpected.
        ``on_acked`` is called with the entry ids of each XACK, after it.
        The other options (``concurrency``, ``batch``, ``block_ms``) are
        described on :class:`~esper.oona.group_consumer.GroupOptions`.
        """
        from esper.oona.group_consumer import GroupConsumer

        return GroupConsumer(self, stream, handler, **options)

    def broadcast(
        self, stream: str, handler: Handler, **options: Unpack[BroadcastOptions]
    ) -> BroadcastConsumer:
        """A reader that sees every entry of ``stream``, independent of groups and of other readers.

        Options (``types``, ``start_id``, ``batch``, ``block_ms``,
        ``ignore_types``): :class:`~esper.oona.broadcast_consumer.BroadcastOptions`.
        """
        from esper.oona.broadcast_consumer import BroadcastConsumer

        return BroadcastConsumer(self, stream, handler, **options)

    # -- consumer write paths (used by the consumers) ----------------------------------

    async def dead_letter(
        self,
        stream: str,
        group: str,
        rejected: Sequence[tuple[str, Mapping[bytes, bytes], RejectReason | str, str]],
    ) -> None:
        """Copy rejected entries to the dead-letter stream and ack them, atomically (MULTI).

        ``reason`` is a ``RejectReason`` or an application reason carried by
        ``RejectMessage`` (e.g. ``policy_stale_version``).
        """
        if not rejected:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            for entry_id, fields, reason, detail in rejected:
                pipe.xadd(
                    self.config.dead_letter_stream,
                    envelope.dead_letter_fields(  # type: ignore[arg-type]
                        fields, reason=reason, stream=stream, entry_id=entry_id, detail=detail
                    ),
                )
            pipe.xack(stream, group, *[item[0] for item in rejected])
            await pipe.execute()
        for entry_id, _fields, reason, detail in rejected:
            self.metrics.on_dead_letter(str(reason))
            _log.warning(
                "oona.dead_letter", stream=stream, entry_id=entry_id, reason=str(reason), detail=detail
            )

    async def requeue(self, group: str, message: OonaMessage) -> None:
        """Re-add a re-signed copy with attempt+1 and ack the original, atomically (MULTI)."""
        fields = envelope.resign(
            self.keyring,
            message.message_type,
            message.payload,
            message.attributes,
            source=self.config.source,
            attempt=message.attempt + 1,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(message.stream, fields)  # type: ignore[arg-type]
            pipe.xack(message.stream, group, message.entry_id)
            await pipe.execute()
        self.metrics.on_retry(message.stream)

    # -- depth, housekeeping, metrics ------------------------------------------------

    async def refresh_depths(self) -> dict[str, dict[str, int]]:
        """Pending entries per group for every stream (XINFO GROUPS); updates the gauges."""
        out: dict[str, dict[str, int]] = {}
        for stream in self.config.streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                groups = []
            per_group: dict[str, int] = {}
            for info in groups:
                raw_name: Any = info["name"]
                name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
                depth = int(info.get("pending") or 0)
                per_group[name] = depth
                self.metrics.set_pending(stream, name, depth, primary=name == self.config.group)
                if name == self.config.group:
                    self._depths[stream] = (time.monotonic(), depth)
            if self.config.group not in per_group:
                self.metrics.set_pending(stream, self.config.group, 0, primary=True)
            out[stream] = per_group
        return out

    async def housekeeping(self) -> dict[str, int]:
        """Trim every stream by TTL and max length, never past an un-acked entry."""
        c = self.config
        return await trim_streams(
            self.redis,
            c.streams,
            ttl_ms=c.message_ttl_ms,
            max_length=c.max_stream_length,
            dead_letter_stream=c.dead_letter_stream,
            dead_letter_max_length=c.dead_letter_max_length,
        )

    def metrics_snapshot(self) -> dict[str, float]:
        snap = self.metrics.snapshot()
        snap[f"breaker.{self._breaker_prefix}publish.state"] = float(self.publish_breaker.state)
        snap[f"breaker.{self._breaker_prefix}consume.state"] = float(self.consume_breaker.state)
        return snap

    def metrics_packet(self) -> leyline_pb2.TelemetryPacket:
        """Snapshot as a TelemetryPacket (source ``oona``), ready for ``publish_telemetry``."""
        self.metrics.set_breaker(self.publish_breaker.name, int(self.publish_breaker.state))
        self.metrics.set_breaker(self.consume_breaker.name, int(self.consume_breaker.state))
        return self.metrics.packet("oona")
