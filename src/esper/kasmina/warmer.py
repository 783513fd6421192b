"""Kasmina's role inside the control plane: keep the kernels about to be grafted warm.

Training processes graft seeds; the control plane has no host model (and
no torch). What it can do is make every graft fast and safe: when Tamiyo
commands a GERMINATE (seen on ``oona.normal``) or the forge announces a
kernel (``KernelCatalogUpdate`` on ``oona.kernels.ready``), the warmer
verifies the catalogued artifact through the library it shares with the
prefetch worker (checksum, manifest, guard digest and safetensors header,
hashed at most once per file version). "Warm" means exactly that: the
prefetch worker then answers the trainer's ``KernelPrefetchRequest`` without
hashing the file again, and a corrupt artifact is reported before any
trainer asks for it. Building the module - the full load check that tensors
fit their family - happens in the trainer, which loads and verifies every
kernel it attaches.

Each warm-up produces a ``kasmina`` telemetry packet whose priority rides in
``system_health.indicators["priority"]`` (HIGH when verification failed), so
the service forwards it at its own priority.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections import deque

from esper.core.logs import get_logger
from esper.core.telemetry import PRIORITY_INDICATOR, TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.core.untrusted import bounded
from esper.core.worker import WorkerContext, run_children
from esper.leyline import leyline_pb2
from esper.oona import BroadcastReader, OonaClient, OonaMessage
from esper.urza import UrzaError, UrzaLibrary

_log = get_logger("esper.kasmina.warmer")
_COMMAND = leyline_pb2.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
_CATALOG = leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE


class KernelWarmer:
    """Verifies the kernels named by commands and catalog updates before trainers ask for them.

    ``commands`` and ``catalog`` are broadcast readers: every replica of the
    control plane warms every kernel, so whichever replica a trainer's
    request reaches answers from a warm cache. Run with ``await warmer.run(ctx)``.
    Warming only reads and caches, so seeing a message twice is harmless.
    """

    def __init__(self, client: OonaClient, library: UrzaLibrary, *, telemetry_capacity: int = 64) -> None:
        self.client = client
        self.library = library
        config = client.config
        self.commands: BroadcastReader = client.broadcast(
            config.normal_stream,
            self._on_command,
            types={_COMMAND},
            ignore_types={
                leyline_pb2.BUS_MESSAGE_TYPE_SYSTEM_STATE,
                leyline_pb2.BUS_MESSAGE_TYPE_FIELD_REPORT,
            },
        )
        self.catalog: BroadcastReader = client.broadcast(
            config.kernel_ready_stream,
            self._on_catalog_update,
            types={_CATALOG},
            ignore_types={leyline_pb2.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY},
            # Announcements are rare among the ready replies and warming can wait a moment: read the
            # shared stream ten times a second at most, not once per burst of replies.
            batch=512,
            linger_ms=100,
        )
        self.outcomes: Tally[str] = Tally()
        self.warm: dict[str, str] = {}  # blueprint id -> checksum of the warmed artifact
        self._packets: deque[leyline_pb2.TelemetryPacket] = deque(maxlen=telemetry_capacity)
        self.telemetry_dropped = 0

    async def run(self, ctx: WorkerContext) -> None:
        await run_children(ctx, {"commands": self.commands.run, "catalog": self.catalog.run})

    async def _on_command(self, message: OonaMessage) -> None:
        command = message.decode(leyline_pb2.AdaptationCommand)
        if (
            command.command_type == leyline_pb2.COMMAND_SEED
            and command.WhichOneof("payload") == "seed_operation"
            and command.seed_operation.operation == leyline_pb2.SEED_OP_GERMINATE
            and command.seed_operation.blueprint_id
        ):
            await self.warm_kernel(command.seed_operation.blueprint_id, trigger="command")

    async def _on_catalog_update(self, message: OonaMessage) -> None:
        update = message.decode(leyline_pb2.KernelCatalogUpdate)
        if update.blueprint_id:
            await self.warm_kernel(update.blueprint_id, trigger="catalog_update")

    async def warm_kernel(self, blueprint_id: str, *, trigger: str) -> bool:
        """Verify one catalogued kernel off the event loop (no module is built); True if it can be served."""
        started = time.perf_counter()
        try:
            info = await self.library.averify_artifact(blueprint_id)
        except UrzaError as exc:
            self.outcomes[exc.reason] += 1
            self.warm.pop(blueprint_id, None)
            _log.warning(
                "kasmina.warm_failed", blueprint_id=bounded(blueprint_id), reason=exc.reason, trigger=trigger
            )
            self._report(blueprint_id, trigger, ok=False, reason=exc.reason, started=started)
            return False
        self.outcomes["warmed"] += 1
        self.warm[blueprint_id] = info.checksum
        self._report(blueprint_id, trigger, ok=True, reason="", started=started)
        return True

    def _report(self, blueprint_id: str, trigger: str, *, ok: bool, reason: str, started: float) -> None:
        level = leyline_pb2.TELEMETRY_LEVEL_INFO if ok else leyline_pb2.TELEMETRY_LEVEL_WARNING
        packet = build_telemetry_packet(
            source="kasmina",
            level=level,
            metrics=[
                TelemetryMetric("kasmina.warm.latency_ms", (time.perf_counter() - started) * 1000, "ms"),
                TelemetryMetric("kasmina.warm.kernels", float(len(self.warm)), "count"),
                TelemetryMetric(
                    "kasmina.warm.failures_total",
                    float(sum(self.outcomes.values()) - self.outcomes["warmed"]),
                    "count",
                ),
            ],
            events=[
                TelemetryEvent(
                    "kernel_warmed" if ok else "kernel_warm_failed",
                    level=level,
                    attributes={"blueprint_id": blueprint_id, "trigger": trigger, "reason": reason},
                )
            ],
            health_status=leyline_pb2.HEALTH_STATUS_HEALTHY if ok else leyline_pb2.HEALTH_STATUS_DEGRADED,
            health_summary="warm" if ok else reason,
            health_indicators={PRIORITY_INDICATOR: "NORMAL" if ok else "HIGH"},
        )
        if len(self._packets) == self._packets.maxlen:
            self.telemetry_dropped += 1
        self._packets.append(packet)

    def drain_telemetry(self) -> list[leyline_pb2.TelemetryPacket]:
        packets = list(self._packets)
        self._packets.clear()
        return packets

    def metrics_snapshot(self) -> dict[str, float]:
        snapshot = {f"kasmina.warm.{k}": float(v) for k, v in self.outcomes.items()}
        snapshot["kasmina.warm.kernels"] = float(len(self.warm))
        snapshot["kasmina.warm.telemetry_dropped"] = float(self.telemetry_dropped)
        return snapshot
