"""The controller's decisions on a run's epochs, read from its telemetry.

Tamiyo answers every ``SystemStatePacket`` with one decision telemetry
packet (source ``tamiyo``, ``training_run_id`` and ``action`` indicators,
the packet's validation loss as ``tamiyo.validation_loss``), published in the
same commit as the command it issued, if any. Reading those lets a trainer

* stop waiting as soon as the controller has decided, instead of waiting out
  ``command_wait_s`` on every epoch that gets no command;
* say why nothing was grafted (``germination_deferred: no free seed slot``,
  ``pause_triggered``, ``bp_unknown``...).

Whether a decision came with a command is read from the same packet:
PAUSE/OPTIMIZER/GERMINATE issue one unless an event says the germination was
deferred or its blueprint unknown, and ``pause_triggered`` says outright
(``command_issued``). A wrong guess only costs time: the command is still
applied when it arrives, at the next batch boundary.

HIGH-priority decisions (any warning) travel on the emergency stream, so
:class:`DecisionReader` reads both telemetry streams as broadcast readers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from esper.core.worker import WorkerContext, run_children
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage

_L = leyline_pb2
_TELEMETRY = _L.BUS_MESSAGE_TYPE_TELEMETRY
#: Events after which the controller issued no command.
_NO_COMMAND = frozenset({"germination_deferred", "bp_unknown", "bp_metadata_unavailable"})


@dataclass(frozen=True)
class ControllerDecision:
    """One decision of the controller on one state packet of this run.

    ``reasons`` are the decision's events with their ``reason`` attribute when
    they have one, e.g. ``germination_deferred: no free seed slot in the model``.
    """

    action: str
    summary: str
    reasons: tuple[str, ...]
    validation_loss: float
    command_issued: bool

    def describe(self) -> str:
        """``germinate``, or ``germinate (germination_deferred: seed seed-1 still grafting)``."""
        return f"{self.action} ({'; '.join(self.reasons)})" if self.reasons else self.action


def decision_from_packet(packet: leyline_pb2.TelemetryPacket) -> ControllerDecision:
    indicators = packet.system_health.indicators
    action = indicators.get("action", "unknown")
    events = {event.description: event for event in packet.events}
    reasons = tuple(
        f"{name}: {event.attributes['reason']}" if event.attributes.get("reason") else name
        for name, event in events.items()
    )
    pause = events.get("pause_triggered")
    if pause is not None and "command_issued" in pause.attributes:
        issued = pause.attributes["command_issued"] == "true"
    else:
        issued = action not in ("no_op", "unknown") and not (_NO_COMMAND & set(events))
    loss = next((m.value for m in packet.metrics if m.name == "tamiyo.validation_loss"), float("nan"))
    return ControllerDecision(action, packet.system_health.summary, reasons, float(loss), issued)


class DecisionReader:
    """Hands the controller's decisions on ``training_run_id`` to ``on_decision``; run it as a worker."""

    def __init__(
        self,
        client: OonaClient,
        training_run_id: str,
        on_decision: Callable[[ControllerDecision], None],
    ) -> None:
        self.client = client
        self.training_run_id = training_run_id
        self.on_decision = on_decision
        self.seen = 0

    async def handle(self, message: OonaMessage) -> None:
        packet = message.decode(leyline_pb2.TelemetryPacket)
        if packet.source_subsystem != "tamiyo":
            return
        if packet.system_health.indicators.get("training_run_id") != self.training_run_id:
            return
        if "action" not in packet.system_health.indicators:
            return  # policy-update reports share the source; only decisions name an action
        self.seen += 1
        self.on_decision(decision_from_packet(packet))

    async def run(self, ctx: WorkerContext) -> None:
        """Read both telemetry streams from now on until ``ctx.stopping``."""
        config = self.client.config
        telemetry = self.client.broadcast(config.telemetry_stream, self.handle, types={_TELEMETRY})
        emergency = self.client.broadcast(
            config.emergency_stream,
            self.handle,
            types={_TELEMETRY},
            ignore_types={_L.BUS_MESSAGE_TYPE_SYSTEM_STATE},
        )
        await run_children(ctx, {"telemetry": telemetry.run, "emergency": emergency.run})
