"""TamiyoService: the controller on the bus.

Two group consumers (one replica of the service's group handles each entry):

* ``oona.normal``, type ``SYSTEM_STATE`` (commands and field reports on the
  same stream are verified and ignored): ``controller.evaluate(state)`` runs
  in a worker thread (policy inference plus the field-report fsync), then the
  signed command is published with ``publish_command``, the decision's field
  report with ``publish_field_report``, and the controller's queued telemetry
  with ``publish_telemetry`` — NORMAL priority, HIGH when a packet's health
  is not HEALTHY.
* ``oona.policy``, type ``POLICY_UPDATE``: ``controller.apply_policy_update``
  (also off the loop). A rejected update raises
  :class:`~esper.oona.RejectMessage` with reason ``policy_<reason>`` (e.g.
  ``policy_stale_version``, ``policy_key_mismatch``,
  ``policy_unsafe_payload``), so Oona dead-letters it at once, never
  retries it, and the running policy is untouched (the registry swaps only
  after full validation). ``persist_failed`` is the exception: a disk
  problem, so it is raised as an ordinary failure and retried.

Publish failures — the choice made here: the *command* and the *field
report* must not be lost, so a refused publish raises
:class:`DecisionNotPublished` and Oona retries the state entry with backoff
(dead-lettering it after the maximum). The decision is **not** re-evaluated
on the retry: what is left to publish is kept, keyed by the packet's bytes,
and sent again, so the controller's per-run history (loss trend, pending
command, field report) changes once per packet. Telemetry is best effort:
a refusal is counted and logged, not retried.

Telemetry comes from one source only: ``controller.drain_telemetry()``
(which holds each decision's packet and each policy-update packet, every
packet handed out once); ``Decision.telemetry`` is not published separately.

Run as an owned task: ``await service.run()`` until ``await service.stop()``
(or the caller's ``stop_event``). Inside, one ``TaskGroup`` owns both
consumers; nothing is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from esper.core import get_logger
from esper.core.tasks import RunGuard
from esper.leyline import leyline_pb2
from esper.oona import GroupConsumer, OonaClient, OonaMessage, PublishResult, RejectMessage, run_consumers
from esper.tamiyo.controller import TamiyoController

_LOG = get_logger(__name__)
_STATE = leyline_pb2.BUS_MESSAGE_TYPE_SYSTEM_STATE
_COMMAND = leyline_pb2.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
_REPORT = leyline_pb2.BUS_MESSAGE_TYPE_FIELD_REPORT
_POLICY = leyline_pb2.BUS_MESSAGE_TYPE_POLICY_UPDATE
#: Registry reasons that are infrastructure trouble (retry), not a bad update (dead letter).
RETRYABLE_POLICY_REASONS = frozenset({"persist_failed"})


class DecisionNotPublished(RuntimeError):
    """The command or field report could not be published; raised so Oona retries the state."""


@dataclass
class _Unpublished:
    command: leyline_pb2.AdaptationCommand | None
    report: leyline_pb2.FieldReport | None
    telemetry: list[leyline_pb2.TelemetryPacket] = field(default_factory=list)


def telemetry_priority(packet: leyline_pb2.TelemetryPacket) -> leyline_pb2.MessagePriority.ValueType:
    """NORMAL for a healthy packet, HIGH otherwise (HIGH is routed to the emergency stream)."""
    if packet.system_health.status in (leyline_pb2.HEALTH_STATUS_HEALTHY, leyline_pb2.HEALTH_STATUS_UNKNOWN):
        return leyline_pb2.MESSAGE_PRIORITY_NORMAL
    return leyline_pb2.MESSAGE_PRIORITY_HIGH


class TamiyoService:
    """Runs a :class:`TamiyoController` behind Oona (see the module docstring)."""

    def __init__(
        self,
        client: OonaClient,
        controller: TamiyoController,
        *,
        policy_max_age_s: float | None = None,
        pending_capacity: int = 256,
        heartbeat_interval_s: float = 1.0,
    ) -> None:
        self.client = client
        self.controller = controller
        self.policy_max_age_s = policy_max_age_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self._pending_capacity = max(1, pending_capacity)
        self._unpublished: OrderedDict[str, _Unpublished] = OrderedDict()
        self._counts: Counter[str] = Counter()
        self._guard = RunGuard("service")
        config = client.config
        self.state_consumer: GroupConsumer = client.consumer(
            config.normal_stream, self.handle_state, types={_STATE}, ignore_types={_COMMAND, _REPORT}
        )
        self.policy_consumer: GroupConsumer = client.consumer(
            config.policy_stream, self.handle_policy, types={_POLICY}
        )

    # ------------------------------------------------------------------ handlers
    async def handle_state(self, message: OonaMessage) -> None:
        """Evaluate one SystemStatePacket and publish what it produced (state consumer handler)."""
        key = hashlib.sha256(message.payload).hexdigest()
        work = self._unpublished.get(key)
        state = message.decode(leyline_pb2.SystemStatePacket)
        if work is None:
            try:
                decision = await asyncio.to_thread(self.controller.evaluate, state)
            except Exception:
                self._counts["evaluate_failed"] += 1
                raise
            self._counts["states_evaluated"] += 1
            if decision.command is None:
                self._counts["decisions_without_command"] += 1
            work = _Unpublished(decision.command, decision.field_report)
            self._unpublished[key] = work
            while len(self._unpublished) > self._pending_capacity:
                self._unpublished.popitem(last=False)
                self._counts["unpublished_evicted"] += 1
        else:
            self._counts["states_republished"] += 1
        work.telemetry.extend(self.controller.drain_telemetry())
        if work.command is not None:
            await self._must_publish("command", self.client.publish_command(work.command))
            self._counts["commands_published"] += 1
            work.command = None
        if work.report is not None:
            await self._must_publish("field_report", self.client.publish_field_report(work.report))
            self._counts["field_reports_published"] += 1
            work.report = None
        await self._publish_telemetry(work.telemetry)
        self._unpublished.pop(key, None)

    async def _must_publish(self, what: str, publishing: Awaitable[PublishResult]) -> None:
        result = await publishing
        if not result.ok:
            self._counts[f"{what}_publish_failed.{result.reason}"] += 1
            _LOG.warning("tamiyo.publish_failed", what=what, reason=result.reason)
            raise DecisionNotPublished(f"{what} refused: {result.reason}")

    async def _publish_telemetry(self, packets: list[leyline_pb2.TelemetryPacket]) -> None:
        """Best effort: each packet once; refusals are counted, never retried."""
        while packets:
            packet = packets.pop(0)
            result = await self.client.publish_telemetry(packet, telemetry_priority(packet))
            if result.ok:
                self._counts["telemetry_published"] += 1
            else:
                self._counts[f"telemetry_publish_failed.{result.reason}"] += 1
                _LOG.warning("tamiyo.telemetry_publish_failed", reason=result.reason)

    async def handle_policy(self, message: OonaMessage) -> None:
        """Apply one PolicyUpdate; a rejection dead-letters it with ``policy_<reason>``."""
        update = message.decode(leyline_pb2.PolicyUpdate)
        result = await asyncio.to_thread(
            self.controller.apply_policy_update, update, max_age_s=self.policy_max_age_s
        )
        await self._publish_telemetry(self.controller.drain_telemetry())
        if result.accepted:
            self._counts["policy_updates_accepted"] += 1
            _LOG.info("tamiyo.policy_update_applied", version=result.current_version)
            return
        self._counts[f"policy_updates_rejected.{result.reason}"] += 1
        if result.reason in RETRYABLE_POLICY_REASONS:
            raise RuntimeError(f"policy update not applied: {result.reason}")
        raise RejectMessage(f"policy_{result.reason}", result.detail[:200])

    # ------------------------------------------------------------------ running
    async def run(
        self,
        *,
        stop_event: asyncio.Event | None = None,
        on_ready: Callable[[], None] | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> None:
        """Consume states and policy updates until :meth:`stop` or ``stop_event``.

        ``on_ready`` is called once the consumer groups exist; ``heartbeat``
        every ``heartbeat_interval_s`` while running (it shows the event loop
        is alive; a consumer that fails for a non-transient reason ends
        ``run`` with its error, for the supervisor to restart).
        """
        with self._guard.running_scope():
            config = self.client.config
            await self.client.ensure_group(config.normal_stream)
            await self.client.ensure_group(config.policy_stream)

            def started() -> None:
                if on_ready is not None:
                    on_ready()
                _LOG.info("tamiyo.service_running", group=config.group)

            async def beat() -> None:
                if heartbeat is not None:
                    heartbeat()

            await run_consumers(
                {"tamiyo-states": self.state_consumer, "tamiyo-policy": self.policy_consumer},
                self._guard.stops(stop_event),
                on_ready=started,
                tick_s=self.heartbeat_interval_s,
                on_tick=beat,
            )

    async def stop(self) -> None:
        """Let the batches in flight finish and be acked, then return from :meth:`run`."""
        await self._guard.stop()

    @property
    def consumers(self) -> tuple[GroupConsumer, GroupConsumer]:
        """The state and policy consumers (their ``iterations`` show progress to a watchdog)."""
        return (self.state_consumer, self.policy_consumer)

    # ------------------------------------------------------------------ metrics
    def metrics_snapshot(self) -> dict[str, float]:
        """Counters by bare name (the caller adds a prefix such as ``tamiyo.service.``).

        ``states_evaluated``, ``commands_published``, ``field_reports_published``,
        ``telemetry_published``, ``policy_updates_accepted``,
        ``policy_updates_rejected.<reason>``, ``<what>_publish_failed.<reason>``,
        ``states_republished``, ``evaluate_failed``; plus ``unpublished`` and
        ``policy_version``.
        """
        snap = {k: float(v) for k, v in self._counts.items()}
        snap["unpublished"] = float(len(self._unpublished))
        snap["policy_version"] = float(self.controller.policy_version)
        return snap

    def count(self, name: str) -> int:
        """One raw counter, e.g. ``"commands_published"`` or ``"policy_updates_rejected.stale_version"``."""
        return self._counts[name]
