"""KasminaPrefetchCoordinator: Kasmina's kernel provider over the Oona bus.

Request → reply, matched by ``request_id``::

    manager.germinate(...)  ──request()──▶  KernelPrefetchRequest on oona.kernels.requests
                                              (Urza's prefetch worker answers)
    oona.kernels.ready   KernelArtifactReady ──▶ verify checksum + guard, load off the loop
                                              ──▶ manager.attach_kernel(..., load_ms, source="bus")
    oona.kernels.errors  KernelArtifactError ──▶ manager.kernel_failed(..., reason)

Differences from esper-lite v1:

* the publish result is checked: a refused or timed-out publish is reported
  at once through ``kernel_failed(reason="publish_<reason>")`` (counted),
  which grafts the explained fallback instead of stranding the seed;
* replies are read with *broadcast* readers, because every training process
  must see the replies to its own requests; they are matched against this
  coordinator's outstanding request ids. Replies for other processes are
  skipped quietly (counted as ``foreign``), a second reply for an id that was
  already answered is ignored (counted as ``duplicate``);
* message types are declared: the ready reader takes only
  ``KERNEL_PREFETCH_READY`` and ignores ``KERNEL_CATALOG_UPDATE``, which
  shares that stream;
* the artifact is verified (checksum *and* guard digest) and loaded off the
  event loop with :meth:`UrzaRuntime.aload_verified`; the local load time is
  what goes to ``attach_kernel``, so the manager's 10 ms budget applies to
  it and the breaker and kernel cache are used. A verification failure is
  reported as ``kernel_failed(reason=<urza reason>)``, e.g.
  ``checksum_mismatch``, and counted;
* lost requests do not strand a seed: :meth:`run` calls
  ``manager.expire_pending()`` every ``expire_interval_s`` (waiting on the
  stop event, not sleeping), so the manager times the request out, retries
  once and then grafts ``BP001`` or ``nn.Identity`` with a
  ``fallback_applied`` event.

Structured concurrency: :meth:`run` is a worker (``await coordinator.run(ctx)``)
owning both readers and the expiry loop as children (``run_children``); it
returns once ``ctx.stopping`` is set; nothing is fire-and-forget. Every manager call happens on
the event loop that runs the coordinator, so the training loop calling
``manager.step()`` must run on that loop too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from esper.core.logs import get_logger
from esper.core.untrusted import bounded
from esper.core.worker import WorkerContext, run_children
from esper.kasmina.seed_manager import KasminaSeedManager
from esper.leyline import leyline_pb2
from esper.oona import BroadcastReader, OonaClient, OonaMessage
from esper.urza import UrzaError, UrzaRuntime

_log = get_logger("esper.kasmina.prefetch")
_READY = leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
_ERROR = leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR
_CATALOG = leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE
_ANSWERED_MEMORY = 4096


@dataclass(slots=True)
class OutstandingRequest:
    request_id: str
    seed_id: str
    blueprint_id: str
    training_run_id: str
    sent_at: float


class KasminaPrefetchCoordinator:
    """Implements :class:`~esper.kasmina.providers.KernelProvider` over Oona (see the module docstring).

    Construction installs the coordinator as ``manager``'s kernel provider
    (``install=False`` to wire it yourself). ``request_timeout_s``, when
    given, becomes the manager's prefetch timeout (the manager owns timeout,
    retry and fallback); outstanding request ids are forgotten after
    ``timeout * (retries + 2)`` seconds, so a reply later than that is
    counted as ``foreign``. ``on_kernel(seed_id)`` is called once a request
    is settled (kernel attached, failed, or expired into the fallback), so a
    trainer can wait for a graft without polling.
    """

    def __init__(
        self,
        client: OonaClient,
        manager: KasminaSeedManager,
        runtime: UrzaRuntime,
        *,
        training_run_id: str,
        request_timeout_s: float | None = None,
        expire_interval_s: float = 0.5,
        publish_timeout_s: float = 2.0,
        install: bool = True,
        on_kernel: Callable[[str], None] | None = None,
    ) -> None:
        if expire_interval_s <= 0 or publish_timeout_s <= 0:
            raise ValueError("expire_interval_s and publish_timeout_s must be positive")
        if request_timeout_s is not None:
            if request_timeout_s <= 0:
                raise ValueError("request_timeout_s must be positive")
            manager.prefetch_timeout_seconds = request_timeout_s
        self.client = client
        self.manager = manager
        self.runtime = runtime
        self.training_run_id = training_run_id
        self.expire_interval_s = expire_interval_s
        self.publish_timeout_s = publish_timeout_s
        self.on_kernel = on_kernel
        self._outstanding: dict[str, OutstandingRequest] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self._load_ms_total = 0.0
        self._load_ms_max = 0.0
        #: Expiry passes so far.
        self.iterations = 0
        self._ready_reader: BroadcastReader | None = None
        self._error_reader: BroadcastReader | None = None
        if install:
            manager.set_kernel_provider(self)

    # ------------------------------------------------------------------ provider
    @property
    def outstanding(self) -> dict[str, OutstandingRequest]:
        """Request ids awaiting a reply (a copy)."""
        return dict(self._outstanding)

    async def request(self, seed_id: str, blueprint_id: str, training_run_id: str) -> None:
        """Publish one KernelPrefetchRequest; a refused publish fails the request at once."""
        request_id = uuid.uuid4().hex
        run_id = training_run_id or self.training_run_id or "prototype"
        message = leyline_pb2.KernelPrefetchRequest(
            request_id=request_id, blueprint_id=blueprint_id, training_run_id=run_id
        )
        message.issued_at.GetCurrentTime()
        # Registered before publishing: the reply may arrive before the publish returns.
        self._outstanding[request_id] = OutstandingRequest(
            request_id, seed_id, blueprint_id, run_id, time.monotonic()
        )
        try:
            result = await asyncio.wait_for(
                self.client.publish_kernel_prefetch_request(message), self.publish_timeout_s
            )
            reason = None if result.ok else (result.reason or "refused")
        except TimeoutError:
            reason = "timeout"
        if reason is None:
            self._counts["requests_sent"] += 1
            return
        self._outstanding.pop(request_id, None)
        self._counts[f"publish_failed.{reason}"] += 1
        _log.warning(
            "kasmina.prefetch_publish_failed",
            seed_id=bounded(seed_id),
            blueprint_id=bounded(blueprint_id),
            request_id=bounded(request_id),
            reason=reason,
        )
        await self.manager.kernel_failed(seed_id, blueprint_id, f"publish_{reason}")
        self._settled(seed_id)

    def _settled(self, seed_id: str) -> None:
        if self.on_kernel is not None:
            self.on_kernel(seed_id)

    # ------------------------------------------------------------------ replies
    def _claim(self, request_id: str) -> OutstandingRequest | None:
        """The outstanding request a reply answers, or None (foreign or duplicate, counted)."""
        entry = self._outstanding.pop(request_id, None)
        if entry is None:
            if request_id in self._answered:
                self._counts["replies_duplicate"] += 1
                _log.info("kasmina.prefetch_duplicate_reply", request_id=bounded(request_id))
            else:
                self._counts["replies_foreign"] += 1
            return None
        self._answered[request_id] = None
        while len(self._answered) > _ANSWERED_MEMORY:
            self._answered.popitem(last=False)
        return entry

    async def handle_ready(self, message: OonaMessage) -> None:
        """Verify, load off the loop and attach (the ready reader's handler)."""
        ready = message.decode(leyline_pb2.KernelArtifactReady)
        entry = self._claim(ready.request_id)
        if entry is None:
            return
        self._counts["replies_ready"] += 1
        manager = self.manager
        if ready.blueprint_id and ready.blueprint_id != entry.blueprint_id:
            await self._reject(entry, "blueprint_mismatch")
            return
        try:
            module, load_ms = await self.runtime.aload_verified(
                ready.artifact_ref, ready.checksum, ready.guard_digest
            )
        except UrzaError as exc:
            await self._reject(entry, exc.reason)
            return
        except Exception as exc:  # noqa: BLE001 - storage trouble fails this kernel, never the reader
            await self._reject(entry, f"load_error_{type(exc).__name__}")
            return
        self._load_ms_total += load_ms
        self._load_ms_max = max(self._load_ms_max, load_ms)
        attached = await manager.attach_kernel(entry.seed_id, entry.blueprint_id, module, load_ms, "bus")
        self._counts["attached" if attached else "attach_declined"] += 1
        self._settled(entry.seed_id)

    async def _reject(self, entry: OutstandingRequest, reason: str) -> None:
        self._counts[f"verify_failed.{reason}"] += 1
        _log.warning(
            "kasmina.prefetch_artifact_rejected",
            seed_id=bounded(entry.seed_id),
            blueprint_id=bounded(entry.blueprint_id),
            request_id=bounded(entry.request_id),
            reason=reason,
        )
        await self.manager.kernel_failed(entry.seed_id, entry.blueprint_id, reason)
        self._settled(entry.seed_id)

    async def handle_error(self, message: OonaMessage) -> None:
        """Report Urza's refusal to the manager (the error reader's handler)."""
        error = message.decode(leyline_pb2.KernelArtifactError)
        entry = self._claim(error.request_id)
        if entry is None:
            return
        reason = error.reason or "unknown_error"
        self._counts[f"replies_error.{reason}"] += 1
        await self.manager.kernel_failed(entry.seed_id, entry.blueprint_id, reason)
        self._settled(entry.seed_id)

    # ------------------------------------------------------------------ running
    async def run(self, ctx: WorkerContext) -> None:
        """Read replies and expire overdue requests until ``ctx.stopping``.

        Started once both reply readers are positioned (requests sent from
        then on get their replies). A reader that fails for a non-transient
        reason ends ``run`` with that error, for its owner to restart; a new
        ``run`` resumes the reply streams after the last entry seen, so
        replies that came meanwhile are not missed.
        """
        config = self.client.config
        ready_reader = self.client.broadcast(
            config.kernel_ready_stream,
            self.handle_ready,
            types={_READY},
            ignore_types={_CATALOG},
            start_id=self._ready_reader.last_id if self._ready_reader is not None else "$",
        )
        error_reader = self.client.broadcast(
            config.kernel_error_stream,
            self.handle_error,
            types={_ERROR},
            start_id=self._error_reader.last_id if self._error_reader is not None else "$",
        )
        self._ready_reader, self._error_reader = ready_reader, error_reader

        async def expire(child: WorkerContext) -> None:
            child.started()
            while not await child.wait_stopping(self.expire_interval_s):
                await self.tick()
                child.progress()

        _log.info("kasmina.prefetch_running", training_run_id=self.training_run_id)
        await run_children(ctx, {"ready": ready_reader.run, "errors": error_reader.run, "expiry": expire})

    async def tick(self) -> int:
        """One expiry pass: ``manager.expire_pending()`` plus forgetting abandoned ids."""
        self.iterations += 1
        expired = await self.manager.expire_pending()
        if expired:
            self._counts["expired"] += expired
            self._settled("")
        manager = self.manager
        horizon = manager.prefetch_timeout_seconds * (manager.prefetch_retries + 2)
        now = time.monotonic()
        stale = [rid for rid, e in self._outstanding.items() if now - e.sent_at > horizon]
        for rid in stale:
            del self._outstanding[rid]
        if stale:
            self._counts["requests_abandoned"] += len(stale)
        return expired

    # ------------------------------------------------------------------ metrics
    def metrics_snapshot(self) -> dict[str, float]:
        """Counters under ``kasmina.prefetch.``: requests, replies, failures by reason, load times."""
        snap = {f"kasmina.prefetch.{k}": float(v) for k, v in self._counts.items()}
        loads = self._counts["attached"] + self._counts["attach_declined"]
        snap["kasmina.prefetch.outstanding"] = float(len(self._outstanding))
        snap["kasmina.prefetch.load_ms_max"] = self._load_ms_max
        snap["kasmina.prefetch.load_ms_mean"] = self._load_ms_total / loads if loads else 0.0
        return snap

    def count(self, name: str) -> int:
        """One raw counter (e.g. ``"verify_failed.checksum_mismatch"``, ``"replies_foreign"``)."""
        return self._counts[name]
