"""Stream names, consumer identity and tuning for one Oona client.

All knobs live in one frozen ``StreamConfig`` so a service can log exactly
how its bus behaves, and tests can shrink timeouts without touching code.
Defaults follow esper-lite v1 stream names and the platform settings.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from esper.core.settings import EsperSettings

KERNEL_REQUEST_STREAM = "oona.kernels.requests"
KERNEL_READY_STREAM = "oona.kernels.ready"
KERNEL_ERROR_STREAM = "oona.kernels.errors"
DEAD_LETTER_STREAM = "oona.deadletter"


@dataclass(frozen=True)
class StreamConfig:
    """Everything an ``OonaClient`` needs besides a Redis connection and a key ring.

    ``backpressure`` maps a stream name to the pending depth (un-acked entries
    of ``group``) at which publishes to it are refused; streams not listed
    never refuse. ``freshness_window_ms`` bounds how far ``issued_at_ms`` may
    be from the entry's arrival in either direction; replay keys live twice
    that long so a replay is caught for as long as it could still look fresh.
    """

    group: str
    consumer: str
    normal_stream: str = "oona.normal"
    emergency_stream: str = "oona.emergency"
    telemetry_stream: str = "oona.telemetry"
    policy_stream: str = "oona.policy"
    kernel_request_stream: str = KERNEL_REQUEST_STREAM
    kernel_ready_stream: str = KERNEL_READY_STREAM
    kernel_error_stream: str = KERNEL_ERROR_STREAM
    dead_letter_stream: str = DEAD_LETTER_STREAM
    source: str = ""
    max_stream_length: int | None = 10_000
    dead_letter_max_length: int = 10_000
    message_ttl_ms: int | None = 900_000
    freshness_window_ms: int = 60_000
    max_payload_bytes: int = 1 << 20
    retry_max_attempts: int = 5
    retry_idle_ms: int = 60_000
    retry_batch_size: int = 50
    retry_backoff_ms: int = 200
    retry_backoff_max_ms: int = 5_000
    block_ms: int = 1_000
    backpressure: Mapping[str, int] = field(default_factory=dict)
    depth_refresh_ms: int = 1_000
    breaker_failure_threshold: int = 3
    breaker_success_threshold: int = 1
    breaker_timeout_ms: int = 30_000
    #: Open period of the consume breaker. Short: a reader only probes the server
    #: (with its own reconnect backoff), so it should resume soon after recovery.
    consume_breaker_timeout_ms: int | None = 2_000
    publish_breaker_wait_ms: int | None = None
    reconnect_base_ms: int = 100
    reconnect_max_ms: int = 5_000
    max_connections: int = 64

    def __post_init__(self) -> None:
        problems = []
        if not self.group:
            problems.append("group must not be empty")
        if not self.consumer:
            problems.append("consumer must not be empty")
        if self.block_ms <= 0:
            problems.append("block_ms must be > 0 (BLOCK 0 would wait forever)")
        if self.retry_max_attempts < 1:
            problems.append("retry_max_attempts must be >= 1")
        if self.freshness_window_ms <= 0:
            problems.append("freshness_window_ms must be > 0")
        if self.retry_idle_ms <= 0:
            problems.append("retry_idle_ms must be > 0")
        if problems:
            raise ValueError("invalid StreamConfig: " + "; ".join(problems))
        if not self.source:
            object.__setattr__(self, "source", self.consumer)

    @classmethod
    def from_settings(
        cls,
        settings: EsperSettings,
        *,
        group: str,
        consumer_prefix: str | None = None,
        **overrides: Any,
    ) -> StreamConfig:
        """Build the config a service uses; ``consumer_prefix`` defaults to the group.

        The consumer name is unique per process (host-pid) unless
        ``OONA_CONSUMER_NAME`` pins it, so replicas split a group's work.
        """
        base = cls(
            group=group,
            consumer=settings.consumer_name(consumer_prefix or group),
            normal_stream=settings.oona_normal_stream,
            emergency_stream=settings.oona_emergency_stream,
            telemetry_stream=settings.oona_telemetry_stream,
            policy_stream=settings.oona_policy_stream,
            max_stream_length=settings.oona_max_stream_length,
            message_ttl_ms=settings.oona_message_ttl_ms or None,
            freshness_window_ms=settings.kernel_freshness_window_ms,
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
    def replay_ttl_ms(self) -> int:
        return 2 * self.freshness_window_ms

    @property
    def socket_timeout_s(self) -> float:
        """Strictly above the block time, so a BLOCKed read is never cut off by the socket."""
        return self.block_ms / 1000 + 5.0
