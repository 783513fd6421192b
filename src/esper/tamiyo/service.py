"""TamiyoService: the controller on the bus.

Two subscriptions:

* ``oona.normal``, group ``tamiyo``, type ``SYSTEM_STATE`` (commands and field
  reports on the same stream are verified and ignored): one replica evaluates
  each packet with ``controller.evaluate(state)`` in a worker thread (policy
  inference plus the field-report fsync) and returns the signed command, the
  decision's field report and the controller's queued telemetry (NORMAL
  priority, HIGH when a packet's health is not HEALTHY; each packet stamped
  with this replica's instance name) as replies, which Oona
  publishes in the same round trip that acknowledges the packet: a command is
  never lost and never published twice.
* ``oona.policy``, in a group of this replica's own (``tamiyo-policy.<instance>``),
  so *every* replica applies every policy update:
  ``controller.apply_policy_update`` (off the loop). A rejected update raises
  :class:`~esper.oona.RejectMessage` with reason ``policy_<reason>`` (e.g.
  ``policy_stale_version``, ``policy_key_mismatch``, ``policy_unsafe_payload``),
  so Oona dead-letters it at once, never retries it, and the running policy
  is untouched (the registry swaps only after full validation).
  ``persist_failed`` is the exception: a disk problem, raised as an ordinary
  failure and retried.

Idempotency: a state packet may be delivered again (its consumer died before
committing, or the commit was refused). Decisions are remembered by the
digest of the packet's bytes, so the same packet handled again in this
process yields the same replies without touching the run's history a second
time. Applying a policy update is idempotent by version.

Run as a worker: ``await service.run(ctx)`` (both subscriptions as children).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, OrderedDict

from esper.core import get_logger
from esper.core.telemetry import stamp_instance
from esper.core.worker import WorkerContext, run_children
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, RejectMessage, Reply, Subscription
from esper.tamiyo.controller import TamiyoController

_LOG = get_logger(__name__)
_STATE = leyline_pb2.BUS_MESSAGE_TYPE_SYSTEM_STATE
_COMMAND = leyline_pb2.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
_REPORT = leyline_pb2.BUS_MESSAGE_TYPE_FIELD_REPORT
_POLICY = leyline_pb2.BUS_MESSAGE_TYPE_POLICY_UPDATE
_TELEMETRY = leyline_pb2.BUS_MESSAGE_TYPE_TELEMETRY
#: The group in which replicas share the evaluation of system states.
TAMIYO_GROUP = "tamiyo"
#: Registry reasons that are infrastructure trouble (retry), not a bad update (dead letter).
RETRYABLE_POLICY_REASONS = frozenset({"persist_failed"})


def telemetry_priority(packet: leyline_pb2.TelemetryPacket) -> leyline_pb2.MessagePriority.ValueType:
    """NORMAL for a healthy packet, HIGH otherwise (HIGH is routed to the emergency stream)."""
    if packet.system_health.status in (leyline_pb2.HEALTH_STATUS_HEALTHY, leyline_pb2.HEALTH_STATUS_UNKNOWN):
        return leyline_pb2.MESSAGE_PRIORITY_NORMAL
    return leyline_pb2.MESSAGE_PRIORITY_HIGH


def _telemetry_replies(packets: list[leyline_pb2.TelemetryPacket], instance: str) -> list[Reply]:
    """Replies publishing ``packets``, each stamped with this replica's instance name."""
    return [
        Reply(_TELEMETRY, stamp_instance(packet, instance), telemetry_priority(packet)) for packet in packets
    ]


class TamiyoService:
    """Runs a :class:`TamiyoController` behind Oona (see the module docstring)."""

    def __init__(
        self,
        client: OonaClient,
        controller: TamiyoController,
        *,
        policy_max_age_s: float | None = None,
        memory: int = 256,
    ) -> None:
        self.client = client
        self.controller = controller
        self.policy_max_age_s = policy_max_age_s
        self._memory = max(1, memory)
        self._decided: OrderedDict[str, tuple[Reply, ...]] = OrderedDict()
        self._counts: Counter[str] = Counter()
        config = client.config
        self.states: Subscription = client.subscribe(
            config.normal_stream,
            TAMIYO_GROUP,
            self.handle_state,
            types={_STATE},
            ignore_types={_COMMAND, _REPORT},
        )
        self.policy: Subscription = client.subscribe(
            config.policy_stream, f"tamiyo-policy.{config.instance}", self.handle_policy, types={_POLICY}
        )

    # ------------------------------------------------------------------ handlers
    async def handle_state(self, message: OonaMessage) -> tuple[Reply, ...]:
        """Evaluate one SystemStatePacket; its command, field report and telemetry are the replies."""
        key = hashlib.sha256(message.payload).hexdigest()
        remembered = self._decided.get(key)
        if remembered is not None:
            self._counts["states_redelivered"] += 1
            return remembered
        state = message.decode(leyline_pb2.SystemStatePacket)
        try:
            decision = await asyncio.to_thread(self.controller.evaluate, state)
        except Exception:
            self._counts["evaluate_failed"] += 1
            raise
        self._counts["states_evaluated"] += 1
        replies: list[Reply] = []
        if decision.command is not None:
            replies.append(Reply(_COMMAND, decision.command))
            self._counts["commands"] += 1
        else:
            self._counts["decisions_without_command"] += 1
        if decision.field_report is not None:
            replies.append(Reply(_REPORT, decision.field_report))
            self._counts["field_reports"] += 1
        replies += _telemetry_replies(self.controller.drain_telemetry(), self.client.config.instance)
        result = tuple(replies)
        self._decided[key] = result
        while len(self._decided) > self._memory:
            self._decided.popitem(last=False)
        return result

    async def handle_policy(self, message: OonaMessage) -> list[Reply]:
        """Apply one PolicyUpdate; a rejection dead-letters it with ``policy_<reason>``."""
        update = message.decode(leyline_pb2.PolicyUpdate)
        result = await asyncio.to_thread(
            self.controller.apply_policy_update, update, max_age_s=self.policy_max_age_s
        )
        telemetry = _telemetry_replies(self.controller.drain_telemetry(), self.client.config.instance)
        if result.accepted:
            self._counts["policy_updates_accepted"] += 1
            _LOG.info("tamiyo.policy_update_applied", version=result.current_version)
            return telemetry
        self._counts[f"policy_updates_rejected.{result.reason}"] += 1
        if result.reason in RETRYABLE_POLICY_REASONS:
            raise RuntimeError(f"policy update not applied: {result.reason}")
        raise RejectMessage(f"policy_{result.reason}", result.detail[:200])

    # ------------------------------------------------------------------ running
    async def run(self, ctx: WorkerContext) -> None:
        """Consume states and policy updates until ``ctx.stopping`` (started once both subscribe)."""
        _LOG.info("tamiyo.service_running", group=TAMIYO_GROUP, instance=self.client.config.instance)
        await run_children(ctx, {"states": self.states.run, "policy": self.policy.run})

    # ------------------------------------------------------------------ metrics
    def metrics_snapshot(self) -> dict[str, float]:
        """Counters by bare name (the caller adds a prefix such as ``tamiyo.service.``).

        ``states_evaluated``, ``states_redelivered``, ``commands``, ``field_reports``,
        ``decisions_without_command``, ``evaluate_failed``, ``policy_updates_accepted``,
        ``policy_updates_rejected.<reason>``; plus ``policy_version``.
        """
        snap = {k: float(v) for k, v in self._counts.items()}
        snap["policy_version"] = float(self.controller.policy_version)
        return snap

    def count(self, name: str) -> int:
        """One raw counter, e.g. ``"commands"`` or ``"policy_updates_rejected.stale_version"``."""
        return self._counts[name]
