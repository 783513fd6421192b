"""Bus metrics: Prometheus collectors plus a flat snapshot for telemetry.

Collectors are registered on a caller-supplied ``CollectorRegistry`` (a fresh
private one by default) so two clients in one process, or a test suite, never
collide on the global registry. Latencies are real histograms; the snapshot
mirrors every counter so ``metrics_packet`` can ship them over the bus.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from esper.core.telemetry import TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class OonaMetrics:
    """Counters per stream and reason, latency histograms and pending-depth gauges."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.published = Counter("oona_published", "Entries published", ["stream"], registry=r)
        self.publish_failed = Counter(
            "oona_publish_failed", "Publishes refused or failed", ["stream", "reason"], registry=r
        )
        self.consumed = Counter("oona_consumed", "Entries handled successfully", ["stream"], registry=r)
        self.rejected = Counter(
            "oona_rejected", "Consumed entries rejected", ["stream", "reason"], registry=r
        )
        self.ignored = Counter(
            "oona_ignored", "Verified entries of a type the consumer does not handle", ["stream"], registry=r
        )
        self.retries = Counter(
            "oona_retries", "Failed deliveries scheduled to be delivered again", ["stream"], registry=r
        )
        self.claimed = Counter(
            "oona_claimed",
            "Entries taken over from a consumer that stopped answering",
            ["stream"],
            registry=r,
        )
        self.lost = Counter(
            "oona_lost",
            "Entries another consumer took over, or whose group was deleted, before this one committed "
            "(their replies were dropped)",
            ["stream"],
            registry=r,
        )
        self.commit_failures = Counter(
            "oona_commit_failures",
            "Commits (acks, replies, dead letters) the server refused",
            ["stream"],
            registry=r,
        )
        self.trimmed = Counter("oona_trimmed", "Entries removed by housekeeping", ["stream"], registry=r)
        self.trimmed_unread = Counter(
            "oona_trimmed_unread",
            "Entries trimmed (by housekeeping or the length cap) before a group had read them",
            ["stream", "group"],
            registry=r,
        )
        self.dead_letters = Counter(
            "oona_dead_letters", "Entries copied to the dead letter stream", ["reason"], registry=r
        )
        self.backpressure = Counter(
            "oona_backpressure_refusals", "Publishes refused by backpressure", ["stream"], registry=r
        )
        self.publish_latency = Histogram(
            "oona_publish_latency_seconds", "XADD latency", ["stream"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.handler_latency = Histogram(
            "oona_handler_latency_seconds",
            "Handler run time",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pending = Gauge("oona_pending", "Un-acked entries per group", ["stream", "group"], registry=r)
        self.breaker_state = Gauge("oona_breaker_state", "CircuitBreakerState value", ["breaker"], registry=r)
        self._flat: defaultdict[str, float] = defaultdict(float)
        # The per-message paths (publish, consume) look their labelled children up once per stream.
        self._per_message = {
            "published": (self.published, self.publish_latency),
            "consumed": (self.consumed, self.handler_latency),
        }
        self._children: dict[tuple[str, str], tuple[Any, Any, str]] = {}

    def _bump(self, key: str, amount: float = 1.0) -> None:
        self._flat[key] += amount

    def _labelled(self, kind: str, stream: str) -> tuple[Any, Any, str]:
        """``kind``'s counter and histogram for ``stream`` and its snapshot key (cached)."""
        children = self._children.get((kind, stream))
        if children is None:
            counter, latency = self._per_message[kind]
            children = (counter.labels(stream), latency.labels(stream), f"{kind}.{stream}")
            self._children[(kind, stream)] = children
        return children

    def on_published(self, stream: str, seconds: float | None = None) -> None:
        """One entry published; ``seconds`` is the XADD's latency (None for a committed reply)."""
        count, latency, key = self._labelled("published", stream)
        count.inc()
        self._bump(key)
        if seconds is not None:
            latency.observe(seconds)
            self._bump("publish_latency_ms.count")
            self._bump("publish_latency_ms.sum", seconds * 1000)

    def on_publish_failed(self, stream: str, reason: str) -> None:
        self.publish_failed.labels(stream, reason).inc()
        self._bump(f"publish_failed.{stream}.{reason}")
        if reason == "backpressure":
            self.backpressure.labels(stream).inc()
            self._bump(f"backpressure.{stream}")

    def on_consumed(self, stream: str, seconds: float) -> None:
        count, latency, key = self._labelled("consumed", stream)
        count.inc()
        latency.observe(seconds)
        self._bump(key)
        self._bump("handler_latency_ms.count")
        self._bump("handler_latency_ms.sum", seconds * 1000)

    def on_handler_failed(self, stream: str, seconds: float) -> None:
        self.handler_latency.labels(stream).observe(seconds)
        self._bump(f"handler_errors.{stream}")

    def on_rejected(self, stream: str, reason: str) -> None:
        self.rejected.labels(stream, reason).inc()
        self._bump(f"rejected.{stream}.{reason}")
        self._bump(f"rejected.{reason}")

    def on_ignored(self, stream: str, count: int) -> None:
        self.ignored.labels(stream).inc(count)
        self._bump(f"ignored.{stream}", count)

    def on_retry(self, stream: str) -> None:
        self.retries.labels(stream).inc()
        self._bump(f"retries.{stream}")

    def on_claimed(self, stream: str, count: int) -> None:
        self.claimed.labels(stream).inc(count)
        self._bump(f"claimed.{stream}", count)

    def on_lost(self, stream: str) -> None:
        self.lost.labels(stream).inc()
        self._bump(f"lost.{stream}")

    def on_commit_failed(self, stream: str) -> None:
        self.commit_failures.labels(stream).inc()
        self._bump(f"commit_failed.{stream}")

    def on_trimmed(self, stream: str, count: int) -> None:
        if count:
            self.trimmed.labels(stream).inc(count)
            self._bump(f"trimmed.{stream}", count)

    def on_trimmed_unread(self, stream: str, group: str, count: int) -> None:
        self.trimmed_unread.labels(stream, group).inc(count)
        self._bump(f"trimmed_unread.{stream}.{group}", count)
        self._bump("trimmed_unread.total", count)

    def on_dead_letter(self, reason: str) -> None:
        self.dead_letters.labels(reason).inc()
        self._bump("deadletter.total")
        self._bump(f"deadletter.{reason}")

    def set_pending(self, stream: str, group: str, depth: int) -> None:
        self.pending.labels(stream, group).set(depth)
        self._flat[f"pending.{stream}.{group}"] = float(depth)

    def set_breaker(self, name: str, state: int) -> None:
        self.breaker_state.labels(name).set(state)
        self._flat[f"breaker.{name}.state"] = float(state)

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge by flat name (without the ``oona.`` prefix)."""
        snap = dict(self._flat)
        snap.setdefault("deadletter.total", 0.0)
        snap.setdefault("trimmed_unread.total", 0.0)
        return snap

    def packet(self, source: str = "oona") -> leyline_pb2.TelemetryPacket:
        """A TelemetryPacket with one ``oona.<name>`` metric per snapshot entry."""
        metrics = [
            TelemetryMetric(name=f"oona.{key}", value=value, unit="ms" if "latency_ms.sum" in key else "")
            for key, value in sorted(self.snapshot().items())
        ]
        return build_telemetry_packet(source=source, metrics=metrics)
