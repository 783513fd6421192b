"""The Urza prefetch worker: answers kernel requests from the bus.

It consumes ``KernelPrefetchRequest`` from ``oona.kernels.requests`` as one
consumer of its group (replicas split the work), in batches, with bounded
concurrency, and answers each with a ``KernelArtifactReady`` carrying a
location-independent ``artifact_ref``, the checksum, the guard digest and the
prewarm percentiles - or a ``KernelArtifactError`` with a machine-readable
reason. Verification runs off the event loop and never re-hashes an
unchanged file (the library remembers verified files by their stat).

The reply is returned to Oona, which publishes it in the same server round
trip that acknowledges the request: a worker killed at any moment answers a
request exactly once. Failure policy: a problem with the *request or the
artifact* is answered with an error reply and counted; the worker keeps
serving. A problem with *our own infrastructure* (database unreachable) is
raised, so Oona delivers the request again after a backoff and finally
dead-letters it - nothing is silently dropped. Handling is idempotent: it
only reads the catalogue and files.
"""

from __future__ import annotations

import os
import time
from collections import Counter as Tally
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Histogram

from esper.core.logs import get_logger
from esper.core.untrusted import bounded
from esper.core.worker import WorkerContext
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, Reply, Subscription
from esper.urza.errors import UrzaError
from esper.urza.library import UrzaLibrary
from esper.urza.records import ArtifactInfo

_log = get_logger("esper.urza.prefetch")
_REQUEST = leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST
#: The consumer group of every prefetch worker: replicas split the requests between them.
PREFETCH_GROUP = "urza-prefetch"
_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class _Answer:
    info: ArtifactInfo
    path: str
    stat_key: tuple[int, int, int]
    expires: float


class UrzaPrefetchWorker:
    """Serves ``KernelPrefetchRequest``s for one Urza library.

    Run it as a worker: ``await worker.run(ctx)`` until ``ctx.stopping``; the
    batch in flight is answered and acknowledged before it returns.
    """

    def __init__(
        self,
        client: OonaClient,
        library: UrzaLibrary,
        *,
        group: str = PREFETCH_GROUP,
        concurrency: int = 16,
        batch: int = 64,
        registry: CollectorRegistry | None = None,
        answer_ttl_s: float = 1.0,
    ) -> None:
        self.client = client
        self.library = library
        self._answer_ttl_s = answer_ttl_s
        self._answers_by_id: dict[str, _Answer] = {}
        self.subscription: Subscription = client.subscribe(
            client.config.kernel_request_stream,
            group,
            self.handle,
            types={_REQUEST},
            policy=replace(client.config.delivery, concurrency=concurrency, batch=batch),
        )
        registry = registry if registry is not None else client.metrics.registry
        self._answers = Counter(
            "urza_prefetch_answers", "Prefetch requests answered", ["outcome"], registry=registry
        )
        self._latency = Histogram(
            "urza_prefetch_latency_seconds",
            "Time from request receipt to reply published",
            buckets=_BUCKETS,
            registry=registry,
        )
        self._tally: Tally[str] = Tally()

    async def run(self, ctx: WorkerContext) -> None:
        await self.subscription.run(ctx)

    async def handle(self, message: OonaMessage) -> list[Reply]:
        """Answer one request (the Oona handler): a ready or an error reply."""
        started = time.perf_counter()
        request = message.decode(leyline_pb2.KernelPrefetchRequest)
        blueprint_id = request.blueprint_id.strip()
        if not request.request_id.strip():
            reply = self._error(request, "missing_request_id")
        elif not blueprint_id:
            reply = self._error(request, "missing_blueprint_id")
        else:
            try:
                info = self._recent_answer(blueprint_id) or await self._verify(blueprint_id)
            except UrzaError as exc:
                _log.warning(
                    "urza.prefetch_error",
                    request_id=bounded(request.request_id),
                    blueprint_id=bounded(blueprint_id),
                    reason=exc.reason,
                )
                reply = self._error(request, exc.reason)
            else:
                ready = leyline_pb2.KernelArtifactReady(
                    request_id=request.request_id,
                    blueprint_id=info.blueprint_id,
                    artifact_ref=info.artifact_ref,
                    checksum=info.checksum,
                    guard_digest=info.guard_digest,
                    prewarm_p50_ms=info.prewarm_p50_ms,
                    prewarm_p95_ms=info.prewarm_p95_ms,
                )
                reply = Reply(leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, ready)
                self._count("ready")
        self._latency.observe(time.perf_counter() - started)
        return [reply]

    def _recent_answer(self, blueprint_id: str) -> ArtifactInfo | None:
        """A verification done less than ``answer_ttl_s`` ago whose file is unchanged.

        Hot blueprints are asked for by every seed of every run; answering
        them from memory saves a database query and a thread hop each time.
        The catalogue row is re-read at least every ``answer_ttl_s`` and the
        file's stat is checked on every use, so a re-forged or tampered
        artifact is noticed at once (and re-verified off the event loop).
        """
        answer = self._answers_by_id.get(blueprint_id)
        if answer is None or time.monotonic() >= answer.expires:
            return None
        try:
            st = os.stat(answer.path)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns, st.st_ino) != answer.stat_key:
            return None
        return answer.info

    async def _verify(self, blueprint_id: str) -> ArtifactInfo:
        self._answers_by_id.pop(blueprint_id, None)
        info = await self.library.averify_artifact(blueprint_id)
        path = str(self.library.resolve_ref(info.artifact_ref))
        try:
            st = os.stat(path)
        except OSError:
            return info
        self._answers_by_id[blueprint_id] = _Answer(
            info, path, (st.st_size, st.st_mtime_ns, st.st_ino), time.monotonic() + self._answer_ttl_s
        )
        return info

    def _error(self, request: leyline_pb2.KernelPrefetchRequest, reason: str) -> Reply:
        error = leyline_pb2.KernelArtifactError(
            request_id=request.request_id, blueprint_id=request.blueprint_id, reason=reason
        )
        self._count(reason)
        return Reply(leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR, error)

    def _count(self, outcome: str) -> None:
        self._answers.labels(outcome).inc()
        self._tally[outcome] += 1

    def metrics_snapshot(self) -> dict[str, float]:
        """Answers by outcome (``ready`` or an error reason), as ``prefetch.<outcome>``."""
        snapshot = {f"prefetch.{k}": float(v) for k, v in self._tally.items()}
        snapshot["prefetch.total"] = float(sum(self._tally.values()))
        return snapshot
