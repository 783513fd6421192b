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

Replicas and idempotency: a run's history lives in Redis
(:mod:`esper.tamiyo.shared_runs`), and a packet is decided only while its
run's lock is held, so consecutive packets of one run give the same decisions
whichever replica receives them (a packet arriving while another replica
decides on the same run is retried shortly). The history also remembers the
last packet decided and its replies: a packet delivered again (its consumer
died, or its commit was refused, after the decision) yields the same replies,
from any replica, without touching the history a second time. Applying a
policy update is idempotent by version.

Run as a worker: ``await service.run(ctx)`` (both subscriptions as children).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter

from esper.core import get_logger
from esper.core.telemetry import stamp_instance
from esper.core.worker import WorkerContext, run_children
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, RejectMessage, Reply, Subscription
from esper.tamiyo.controller import TamiyoController
from esper.tamiyo.registry import PolicyRejected, policy_version_of
from esper.tamiyo.shared_policy import SharedPolicy
from esper.tamiyo.shared_runs import SharedRuns

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
    ) -> None:
        self.client = client
        self.controller = controller
        self.policy_max_age_s = policy_max_age_s
        self.runs = SharedRuns(client)
        self.shared_policy = SharedPolicy(client)
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
        digest = hashlib.sha256(message.payload).hexdigest()
        state = message.decode(leyline_pb2.SystemStatePacket)
        async with self.runs.hold(state.training_run_id) as (held, token):
            if held.last_digest == digest:
                self._counts["states_redelivered"] += 1
                return held.last_replies
            try:
                decision = await asyncio.to_thread(self.controller.evaluate, state, held.state)
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
            await self.runs.save(held, token, digest, result)
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
            await self.shared_policy.offer(update, result.current_version)
            return telemetry
        self._counts[f"policy_updates_rejected.{result.reason}"] += 1
        if result.reason in RETRYABLE_POLICY_REASONS:
            raise RuntimeError(f"policy update not applied: {result.reason}")
        raise RejectMessage(f"policy_{result.reason}", result.detail[:200])

    # ------------------------------------------------------------------ running
    async def run(self, ctx: WorkerContext) -> None:
        """Catch up with the newest accepted policy, then consume states and policy updates.

        Started once both subscriptions are reading; returns at ``ctx.stopping``.
        """
        await self.catch_up_policy()
        _LOG.info("tamiyo.service_running", group=TAMIYO_GROUP, instance=self.client.config.instance)
        await run_children(ctx, {"states": self.states.run, "policy": self.policy.run})

    async def catch_up_policy(self) -> None:
        """Apply the newest update any replica accepted, if it is newer than this one's policy."""
        update = await self.shared_policy.newest()
        if update is None:
            return
        try:
            newer = policy_version_of(update) > self.controller.policy_version
        except PolicyRejected:
            newer = True  # let the registry name what is wrong with it
        if not newer:
            return
        result = await asyncio.to_thread(self.controller.apply_policy_update, update)
        self.controller.drain_telemetry()
        if result.accepted:
            self._counts["policy_caught_up"] += 1
            _LOG.info("tamiyo.policy_caught_up", version=result.current_version)

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
