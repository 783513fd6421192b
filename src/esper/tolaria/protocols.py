"""What Tolaria needs from the components it hosts, as structural protocols.

Tolaria does not import Kasmina (same package layer): the manager is typed
by :class:`SeedManager`, which ``esper.kasmina.KasminaSeedManager``
satisfies, and the bus components run alongside training are typed by
:class:`Service`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from torch import nn

from esper.core.telemetry import TelemetryEvent
from esper.core.worker import WorkerContext
from esper.leyline import leyline_pb2


class SeedManager(Protocol):
    """What Tolaria needs from Kasmina's ``KasminaSeedManager``."""

    training_run_id: str

    @property
    def seeds(self) -> Mapping[str, Any]: ...

    def step(self, n: int = 1) -> None: ...

    def update_epoch(self, epoch: int) -> None: ...

    def export_seed_states(self) -> list[leyline_pb2.SeedState]: ...

    def free_slot_count(self) -> int: ...

    def awaiting_kernels(self) -> list[str]: ...

    def seed_parameters(self, seed_id: str | None = None) -> list[nn.Parameter]: ...

    def build_telemetry(self, events: Iterable[TelemetryEvent] = ()) -> leyline_pb2.TelemetryPacket: ...

    def drain_telemetry(self) -> list[leyline_pb2.TelemetryPacket]: ...

    async def handle_command(self, command: leyline_pb2.AdaptationCommand) -> Any: ...


class Service(Protocol):
    """Something to run alongside training (command intake, kernel coordinator), as a worker.

    See :mod:`esper.core.worker`: ``run(ctx)`` calls ``ctx.started()`` once
    serving and returns when ``ctx.stopping`` is set.
    """

    async def run(self, ctx: WorkerContext) -> None: ...
