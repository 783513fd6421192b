"""Stream names, identity, limits and delivery policy for one Oona client.

All knobs live in frozen dataclasses so a service can log exactly how its bus
behaves and tests can shrink timeouts without touching code. Defaults follow
esper-lite v1 stream names and the platform settings.

``StreamConfig`` is about the *client*: who it is (``instance``, the consumer
name it uses in every group it joins), where messages go, and the limits it
enforces. ``DeliveryPolicy`` is about one *subscription*: batch size,
concurrency, the handler deadline, how many deliveries an entry gets and when
a dead consumer's entries are taken over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from esper.core.settings import EsperSettings
from esper.leyline import leyline_pb2
from esper.oona.keys import hash_tag_for
from esper.oona.wire_guard import MAX_ITEMS

KERNEL_REQUEST_STREAM = "oona.kernels.requests"
KERNEL_READY_STREAM = "oona.kernels.ready"
KERNEL_ERROR_STREAM = "oona.kernels.errors"
DEAD_LETTER_STREAM = "oona.deadletter"
#: Headroom of a read over the payload limit (the other fields of an entry, ids, framing).
VALUE_MARGIN = 64 * 1024
_URGENT = frozenset({leyline_pb2.MESSAGE_PRIORITY_HIGH, leyline_pb2.MESSAGE_PRIORITY_CRITICAL})
_URGENT_ROUTED = frozenset(
    {leyline_pb2.BUS_MESSAGE_TYPE_TELEMETRY, leyline_pb2.BUS_MESSAGE_TYPE_SYSTEM_STATE}
)


@dataclass(frozen=True)
class DeliveryPolicy:
    """How one subscription consumes (defaults from the platform settings).

    An entry is delivered at most ``max_deliveries`` times in its group; a
    delivery ends in success, a raised error, a missed ``handler_timeout_ms``
    deadline, or the death of its consumer. Failed deliveries are retried
    after ``retry_backoff_ms`` doubling up to ``retry_backoff_max_ms``,
    without holding up the rest of the batch. Entries left by a consumer that
    stopped answering are taken over after ``claim_idle_ms``.
    """

    batch: int = 16
    concurrency: int = 1
    handler_timeout_ms: int = 30_000
    max_deliveries: int = 5
    retry_backoff_ms: int = 200
    retry_backoff_max_ms: int = 5_000
    claim_idle_ms: int = 15_000
    claim_batch: int = 50

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be >= 1"
            for name in ("batch", "concurrency", "handler_timeout_ms", "max_deliveries", "claim_idle_ms")
            if getattr(self, name) < 1
        ]
        if max(self.batch, self.claim_batch) > MAX_ITEMS:
            # A reply array longer than that is treated as hostile and discarded (wire_guard).
            problems.append(f"batch and claim_batch must be <= {MAX_ITEMS}")
        if self.retry_backoff_max_ms >= self.claim_idle_ms:
            # A failed entry waiting out its backoff would look abandoned and be taken over.
            problems.append("retry_backoff_max_ms must be below claim_idle_ms")
        if problems:
            raise ValueError("invalid DeliveryPolicy: " + "; ".join(problems))

    def backoff_s(self, attempt: int) -> float:
        """Delay before delivery ``attempt + 1`` after delivery ``attempt`` failed."""
        return float(min(self.retry_backoff_ms * 2 ** max(0, attempt - 1), self.retry_backoff_max_ms)) / 1000


@dataclass(frozen=True)
class StreamConfig:
    """Everything an ``OonaClient`` needs besides a Redis connection and a key ring.

    ``instance`` is this process's consumer name in every group it joins: it
    must be unique among live replicas and stable across restarts, so a
    restarted replica resumes its own pending entries at once (see
    :mod:`esper.oona.lease`). Freshness: ``issued_at_ms`` must lie within
    ``freshness_window_ms`` of the reader's clock, either way. Replay keys
    live ``2 * window + clock_skew_ms``: as long as any copy could look fresh
    to any replica. ``backpressure`` maps a stream to the pending depth (the
    most un-acked entries of any of its groups) at which publishing to it is
    refused.
    """

    instance: str
    source: str = ""
    normal_stream: str = "oona.normal"
    emergency_stream: str = "oona.emergency"
    telemetry_stream: str = "oona.telemetry"
    policy_stream: str = "oona.policy"
    kernel_request_stream: str = KERNEL_REQUEST_STREAM
    kernel_ready_stream: str = KERNEL_READY_STREAM
    kernel_error_stream: str = KERNEL_ERROR_STREAM
    dead_letter_stream: str = DEAD_LETTER_STREAM
    #: Cluster mode: every key carries this hash tag so multi-key scripts stay in one slot.
    hash_tag: str | None = None
    max_stream_length: int | None = 10_000
    #: Approximate MAXLEN applied on every XADD; None means 10 x ``max_stream_length``.
    hard_cap: int | None = None
    dead_letter_max_length: int = 10_000
    message_ttl_ms: int | None = 900_000
    freshness_window_ms: int = 60_000
    clock_skew_ms: int = 5_000
    max_payload_bytes: int = 1 << 20
    #: Bytes of entry data one read may hold in memory; the rest is fetched by smaller reads.
    max_read_bytes: int = 8 << 20
    #: The longest a reader's blocking read waits for entries (it returns at once when they come;
    #: a subscription's read also ends when a retry or a look for abandoned entries is due). An
    #: idle reader costs one round trip per block, so a long block keeps an idle service quiet.
    block_ms: int = 5_000
    backpressure: Mapping[str, int] = field(default_factory=dict)
    depth_refresh_ms: int = 1_000
    breaker_failure_threshold: int = 3
    breaker_success_threshold: int = 1
    #: First open window of a breaker; it doubles per failed probe up to ``breaker_open_max_ms``.
    breaker_open_ms: int = 500
    breaker_open_max_ms: int = 30_000
    publish_breaker_wait_ms: int | None = None
    reconnect_base_ms: int = 100
    reconnect_max_ms: int = 1_000
    max_connections: int = 64
    #: The policy of subscriptions that do not bring their own.
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)

    def __post_init__(self) -> None:
        problems = []
        if not self.instance:
            problems.append("instance must not be empty")
        if self.block_ms <= 0:
            problems.append("block_ms must be > 0 (BLOCK 0 would wait forever)")
        if self.freshness_window_ms <= 0:
            problems.append("freshness_window_ms must be > 0")
        if self.max_read_bytes < 2 * self.max_payload_bytes + VALUE_MARGIN:
            problems.append("max_read_bytes must hold at least two payloads (plus 64 KiB of framing)")
        if self.breaker_open_ms <= 0:
            problems.append("breaker_open_ms must be > 0")
        if self.clock_skew_ms < 0:
            problems.append("clock_skew_ms must be >= 0")
        for name in ("max_stream_length", "hard_cap", "dead_letter_max_length"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a whole number >= 1")
        if problems:
            raise ValueError("invalid StreamConfig: " + "; ".join(problems))
        if not self.source:
            object.__setattr__(self, "source", self.instance)

    @classmethod
    def from_settings(cls, settings: EsperSettings, *, instance: str, **overrides: Any) -> StreamConfig:
        """The config a service uses: stream names, limits and delivery policy from settings."""
        base = cls(
            instance=instance,
            normal_stream=settings.oona_normal_stream,
            emergency_stream=settings.oona_emergency_stream,
            telemetry_stream=settings.oona_telemetry_stream,
            policy_stream=settings.oona_policy_stream,
            max_stream_length=settings.oona_max_stream_length,
            hard_cap=settings.oona_stream_hard_cap,
            message_ttl_ms=settings.oona_message_ttl_ms or None,
            freshness_window_ms=settings.kernel_freshness_window_ms,
            hash_tag=hash_tag_for(settings.redis_url),
            delivery=DeliveryPolicy(
                handler_timeout_ms=settings.oona_handler_timeout_ms,
                claim_idle_ms=settings.oona_claim_idle_ms,
                # Backoff stays well below the claim time, however short that is set.
                retry_backoff_ms=min(200, max(1, settings.oona_claim_idle_ms // 20)),
                retry_backoff_max_ms=min(5_000, max(1, settings.oona_claim_idle_ms // 2)),
            ),
        )
        return replace(base, **overrides) if overrides else base

    @property
    def streams(self) -> tuple[str, ...]:
        """All eight streams, dead letter last, without duplicates."""
        names = (
            self.normal_stream,
            self.emergency_stream,
            self.telemetry_stream,
            self.policy_stream,
            self.kernel_request_stream,
            self.kernel_ready_stream,
            self.kernel_error_stream,
            self.dead_letter_stream,
        )
        return tuple(dict.fromkeys(names))

    @property
    def cap(self) -> int | None:
        """The hard length cap applied at publish (approximate MAXLEN)."""
        if self.hard_cap is not None:
            return self.hard_cap
        return None if self.max_stream_length is None else 10 * self.max_stream_length

    @property
    def replay_ttl_ms(self) -> int:
        return 2 * self.freshness_window_ms + self.clock_skew_ms

    @property
    def socket_timeout_s(self) -> float:
        """Strictly above the block time, so a BLOCKed read is never cut off by the socket."""
        return self.block_ms / 1000 + 5.0

    def route(
        self,
        message_type: leyline_pb2.BusMessageType.ValueType,
        priority: leyline_pb2.MessagePriority.ValueType | None = None,
    ) -> str:
        """The stream a message goes to: by type, HIGH/CRITICAL state and telemetry to emergency.

        The choice is per message only; nothing about it is sticky.
        """
        if priority in _URGENT and message_type in _URGENT_ROUTED:
            return self.emergency_stream
        try:
            return self._routes[message_type]
        except KeyError:
            raise ValueError(f"no stream for message type {message_type}") from None

    @cached_property
    def _routes(self) -> dict[int, str]:
        t = leyline_pb2
        return {
            t.BUS_MESSAGE_TYPE_TELEMETRY: self.telemetry_stream,
            t.BUS_MESSAGE_TYPE_SYSTEM_STATE: self.normal_stream,
            t.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND: self.normal_stream,
            t.BUS_MESSAGE_TYPE_FIELD_REPORT: self.normal_stream,
            t.BUS_MESSAGE_TYPE_POLICY_UPDATE: self.policy_stream,
            t.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST: self.kernel_request_stream,
            t.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY: self.kernel_ready_stream,
            t.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE: self.kernel_ready_stream,
            t.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR: self.kernel_error_stream,
        }
