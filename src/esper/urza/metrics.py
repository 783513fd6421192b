"""Urza's counters: what ``metrics_snapshot`` reports and what Prometheus scrapes.

Every error the library raises passes through :meth:`LibraryMetrics.error`
(or :meth:`storage_error` for database / IO failures), so the per-reason
tallies match what callers saw; storage failures are also logged because
they are never turned into a cache miss.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from sqlalchemy.exc import SQLAlchemyError

from esper.core.logs import get_logger
from esper.urza.errors import UrzaError

log = get_logger("esper.urza.library")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class LibraryMetrics:
    """Thread-safe tallies plus their Prometheus twins in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()
        self._counts = {"cache_hits": 0, "cache_misses": 0, "cache_errors": 0, "hash_computations": 0}
        self._errors_by_reason: dict[str, int] = {}
        self._last_latency_ms = 0.0
        self._hits = Counter("urza_kernel_cache_hits", "Kernel loads served from the LRU", registry=registry)
        self._misses = Counter(
            "urza_kernel_cache_misses", "Kernel loads that read the artifact file", registry=registry
        )
        self._errors = Counter(
            "urza_errors", "Urza lookup/verification errors", ["reason"], registry=registry
        )
        self._hashes = Counter(
            "urza_artifact_hashes", "Full SHA-256 computations of artifact files", registry=registry
        )
        self._latency = Histogram(
            "urza_lookup_latency_seconds",
            "Kernel lookup+load latency",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def _count_error(self, reason: str) -> None:
        with self._lock:
            self._counts["cache_errors"] += 1
            self._errors_by_reason[reason] = self._errors_by_reason.get(reason, 0) + 1
        self._errors.labels(reason).inc()

    def error(self, exc: UrzaError) -> UrzaError:
        """Count ``exc`` under its reason and hand it back for raising."""
        self._count_error(exc.reason)
        return exc

    def storage_error(self, exc: BaseException) -> None:
        """Count and log a database or IO failure (the caller re-raises it)."""
        reason = "database_error" if isinstance(exc, SQLAlchemyError) else "io_error"
        self._count_error(reason)
        log.error("urza storage error", reason=reason, error=str(exc))

    def lookup(self, hit: bool) -> None:
        with self._lock:
            self._counts["cache_hits" if hit else "cache_misses"] += 1
        (self._hits if hit else self._misses).inc()

    def hashed(self) -> None:
        with self._lock:
            self._counts["hash_computations"] += 1
        self._hashes.inc()

    def observe(self, operation: str, started: float) -> float:
        """Record the latency of ``operation`` begun at ``started`` (``perf_counter``); returns ms."""
        elapsed = time.perf_counter() - started
        self._latency.labels(operation).observe(elapsed)
        self._last_latency_ms = elapsed * 1000.0
        return self._last_latency_ms

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = dict(self._counts)
            snap["lookup_latency_ms"] = self._last_latency_ms
            snap["errors_by_reason"] = dict(self._errors_by_reason)
        return snap
