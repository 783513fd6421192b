"""TamiyoController: SystemStatePacket in, signed AdaptationCommand out.

Pure decision logic with no bus code, so it is testable in-process and the
Weatherlight service only has to feed packets in and publish what comes out.
Per packet:

1. Features (:mod:`esper.tamiyo.features`) with the loss trend of the *same*
   run, then one deterministic policy decision.
2. The action becomes a command: GERMINATE → ``COMMAND_SEED`` for the next
   free ``seed-<n>`` (deferred while another graft is GERMINATED/TRAINING/
   BLENDING or ``max_seeds`` live seeds exist); OPTIMIZER →
   ``COMMAND_OPTIMIZER``; PAUSE → ``COMMAND_PAUSE``; NO_OP → nothing.
3. Risk rules, in order: unknown blueprint → no command (``bp_unknown``);
   quarantine-only or risk ≥ ``max_blueprint_risk`` → PAUSE with the seed
   payload *cleared* (``bp_quarantine``; esper-lite v1 kept it);
   loss spike (> ``max_loss_spike``) or conservative mode → PAUSE
   (``pause_triggered``). A spike with no command in hand pauses the seed
   being grafted, if there is one.
4. ``issued_at`` is the wall clock now, annotations carry
   ``training_run_id`` (so Kasmina can route it) and the policy/blueprint
   context, and the command is signed last.
5. The previous command of the run, if any, is closed with a FieldReport
   judged on how validation loss moved, and appended to the store.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping

from esper.core import (
    EsperSettings,
    TelemetryEvent,
    TelemetryMetric,
    build_telemetry_packet,
    get_logger,
)
from esper.leyline import leyline_pb2
from esper.security import KeyRing, sign_command
from esper.tamiyo.decision import FEATURE_METRIC_PREFIX, ControllerConfig, Decision, build_decision_telemetry
from esper.tamiyo.features import FEATURE_NAMES, feature_values
from esper.tamiyo.field_reports import FieldReportStore, generate_field_report
from esper.tamiyo.metadata import BlueprintMetadataSource, CachedBlueprintMetadata
from esper.tamiyo.policy import PolicyAction, PolicyConfig, TamiyoPolicy
from esper.tamiyo.registry import PolicyUpdateResult, TamiyoPolicyRegistry
from esper.tamiyo.run_state import (
    FAILED_STAGES,
    PendingCommand,
    RunState,
    RunStateTable,
    in_flight_seed,
    live_seed_count,
    next_seed_id,
    pause_target,
)
from esper.tamiyo.telemetry_buffer import TelemetryBuffer

_LOG = get_logger(__name__)
WARNING = leyline_pb2.TELEMETRY_LEVEL_WARNING

#: ``SystemStatePacket.training_metrics`` key where a trainer reports its free seed slots.
FREE_SLOTS_METRIC = "seed_slots_free"


class TamiyoController:
    """Turns state packets into signed commands; owns policy, risk rules and reports."""

    def __init__(
        self,
        keys: KeyRing,
        blueprints: BlueprintMetadataSource,
        *,
        registry: TamiyoPolicyRegistry | None = None,
        store: FieldReportStore | None = None,
        settings: EsperSettings | None = None,
        config: ControllerConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or ControllerConfig()
        self._keys = keys
        self._blueprints = (
            blueprints
            if isinstance(blueprints, CachedBlueprintMetadata)
            else CachedBlueprintMetadata(blueprints, ttl_s=self.config.metadata_ttl_s)
        )
        self.registry = registry or TamiyoPolicyRegistry(clock=clock)
        self.store = store
        self._clock = clock
        conservative = self.config.conservative_mode
        if conservative is None:
            conservative = bool(settings.tamiyo_conservative_mode) if settings is not None else False
        self._conservative = conservative
        self._runs = RunStateTable(self.config.max_runs)
        self._telemetry = TelemetryBuffer(self.config.telemetry_capacity)
        self._evaluate_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: EsperSettings,
        keys: KeyRing,
        blueprints: BlueprintMetadataSource,
        *,
        config: ControllerConfig | None = None,
        policy_config: PolicyConfig | None = None,
    ) -> TamiyoController:
        """Policy resumed from ``tamiyo_policy_dir``, reports in ``<var_dir>/tamiyo``."""
        return cls(
            keys,
            blueprints,
            registry=TamiyoPolicyRegistry.from_settings(settings, policy_config),
            store=FieldReportStore.from_settings(settings),
            settings=settings,
            config=config,
        )

    # -- read-only views -------------------------------------------------
    @property
    def policy(self) -> TamiyoPolicy:
        return self.registry.policy

    @property
    def policy_version(self) -> int:
        return self.registry.version

    @property
    def conservative_mode(self) -> bool:
        return self._conservative

    @property
    def telemetry_dropped(self) -> int:
        return self._telemetry.dropped

    def set_conservative_mode(self, enabled: bool) -> None:
        self._conservative = enabled

    def drain_telemetry(self, max_items: int | None = None) -> list[leyline_pb2.TelemetryPacket]:
        """Queued telemetry, oldest first, each packet handed out once."""
        return self._telemetry.drain(max_items)

    # -- policy updates and reports ---------------------------------------
    def apply_policy_update(
        self, update: leyline_pb2.PolicyUpdate, *, max_age_s: float | None = None
    ) -> PolicyUpdateResult:
        """Install or reject an update (see :mod:`esper.tamiyo.registry`) and report it."""
        result = self.registry.apply(update, max_age_s=max_age_s)
        level = leyline_pb2.TELEMETRY_LEVEL_INFO if result.accepted else WARNING
        name = "policy_update_accepted" if result.accepted else "policy_update_rejected"
        attributes = {
            "reason": result.reason,
            "policy_id": update.policy_id,
            "update_version": "" if result.update_version is None else str(result.update_version),
        }
        self._telemetry.append(
            build_telemetry_packet(
                source="tamiyo",
                metrics=[TelemetryMetric("tamiyo.policy.version", float(result.current_version))],
                events=[TelemetryEvent(name, level, attributes)],
                level=level,
                health_status=leyline_pb2.HEALTH_STATUS_HEALTHY
                if result.accepted
                else leyline_pb2.HEALTH_STATUS_DEGRADED,
                health_summary=name if result.accepted else result.reason,
            )
        )
        return result

    def generate_field_report(
        self,
        command: leyline_pb2.AdaptationCommand,
        outcome: leyline_pb2.FieldReportOutcome.ValueType,
        metrics_delta: Mapping[str, float],
        *,
        training_run_id: str = "",
        seed_id: str | None = None,
        blueprint_id: str | None = None,
        notes: str = "",
    ) -> leyline_pb2.FieldReport:
        """A report about ``command`` (uuid4 id, issued now), appended to the store if any."""
        report = generate_field_report(
            command,
            outcome,
            metrics_delta,
            training_run_id=training_run_id,
            seed_id=seed_id,
            blueprint_id=blueprint_id,
            notes=notes,
            clock=self._clock,
        )
        if self.store is not None:
            self.store.append(report)
        return report

    # -- the decision -----------------------------------------------------
    def evaluate(self, state: leyline_pb2.SystemStatePacket, run: RunState | None = None) -> Decision:
        """Decide on one packet; never raises for bad metadata (it becomes an event).

        ``run`` is the run's history when the caller keeps it (replicas share
        it in Redis, see :mod:`esper.tamiyo.shared_runs`); it is updated in
        place. Without it the controller's own in-memory table is used.
        Calls are serialised by a lock so history stays consistent when the
        service evaluates from worker threads.
        """
        with self._evaluate_lock:
            return self._evaluate(state, run if run is not None else self._runs.get(state.training_run_id))

    def _evaluate(self, state: leyline_pb2.SystemStatePacket, run: RunState) -> Decision:
        cfg = self.config
        run_id = state.training_run_id
        loss_trend = None if run.previous_loss is None else float(state.validation_loss) - run.previous_loss
        features = feature_values(state, loss_trend)
        policy, version = self.registry.policy, self.registry.version
        started = time.perf_counter()
        output = policy.decide(features)
        latency_ms = (time.perf_counter() - started) * 1000.0

        events: list[TelemetryEvent] = []
        report = self._close_pending(run, state)
        seeds = list(state.seed_states)
        command: leyline_pb2.AdaptationCommand | None = None
        descriptor: leyline_pb2.BlueprintDescriptor | None = None
        risk_reason = ""
        base = {"training_run_id": run_id}

        if output.action is PolicyAction.GERMINATE:
            busy = in_flight_seed(seeds)
            # Trainers may report how many seed slots their model has left.
            free_slots = state.training_metrics.get(FREE_SLOTS_METRIC)
            no_room = free_slots is not None and free_slots < 1
            if busy is not None or no_room or live_seed_count(seeds) >= cfg.max_seeds:
                if busy:
                    why = f"seed {busy} still grafting"
                elif no_room:
                    why = "no free seed slot in the model"
                else:
                    why = f"max_seeds {cfg.max_seeds} reached"
                events.append(TelemetryEvent("germination_deferred", attributes={**base, "reason": why}))
            else:
                descriptor = self._lookup(output.blueprint_id, events, base)
                if descriptor is not None:
                    command = self._new_command(leyline_pb2.COMMAND_SEED, next_seed_id(seeds))
                    command.seed_operation.operation = leyline_pb2.SEED_OP_GERMINATE
                    command.seed_operation.blueprint_id = output.blueprint_id
                    alpha = min(1.0, max(0.0, cfg.base_alpha + cfg.alpha_scale * output.param))
                    command.seed_operation.parameters["alpha"] = alpha
                    command.annotations["blueprint_tier"] = leyline_pb2.BlueprintTier.Name(descriptor.tier)
                    command.annotations["blueprint_risk"] = f"{descriptor.risk:.2f}"
                    command.annotations["blueprint_stage"] = str(descriptor.stage)
                    if descriptor.quarantine_only or descriptor.risk >= cfg.max_blueprint_risk:
                        self._to_pause(command)
                        risk_reason = "blueprint_high_risk"
                        events.append(
                            TelemetryEvent(
                                "bp_quarantine",
                                WARNING,
                                {
                                    **base,
                                    "blueprint_id": output.blueprint_id,
                                    "tier": leyline_pb2.BlueprintTier.Name(descriptor.tier),
                                    "risk": f"{descriptor.risk:.2f}",
                                    "quarantine_only": str(descriptor.quarantine_only).lower(),
                                },
                            )
                        )
        elif output.action is PolicyAction.OPTIMIZER:
            command = self._new_command(leyline_pb2.COMMAND_OPTIMIZER, "")
            command.optimizer_adjustment.optimizer_id = cfg.optimizer_id
            command.optimizer_adjustment.hyperparameters["lr_delta"] = cfg.lr_delta_scale * output.param
        elif output.action is PolicyAction.PAUSE:
            command = self._new_command(leyline_pb2.COMMAND_PAUSE, pause_target(seeds) or "")
            command.annotations["reason"] = "policy"

        spike = loss_trend is not None and loss_trend > cfg.max_loss_spike
        if spike or self._conservative:
            target = pause_target(seeds)
            if command is None and spike and target is not None:
                command = self._new_command(leyline_pb2.COMMAND_PAUSE, target)
            if command is not None:
                self._to_pause(command)
                risk_reason = "conservative_mode" if self._conservative else "loss_spike"
            events.append(
                TelemetryEvent(
                    "pause_triggered",
                    WARNING,
                    {
                        **base,
                        "loss_delta": f"{loss_trend or 0.0:.3f}",
                        "conservative": str(self._conservative).lower(),
                        "command_issued": str(command is not None).lower(),
                    },
                )
            )

        if command is not None:
            annotations = command.annotations
            annotations["training_run_id"] = run_id
            annotations["policy_action"] = output.action.name.lower()
            annotations["policy_version"] = str(version)
            annotations["policy_id"] = self.registry.policy_id
            annotations["policy_param"] = f"{output.param:.6f}"
            if risk_reason:
                annotations["risk_reason"] = risk_reason
            sign_command(command, self._keys)
            run.pending = PendingCommand(
                command=command,
                action=output.action,
                blueprint_index=output.blueprint_index,
                features=features,
                validation_loss=float(state.validation_loss),
                validation_accuracy=float(state.validation_accuracy),
            )
        run.previous_loss = float(state.validation_loss)
        run.previous_accuracy = float(state.validation_accuracy)
        run.last_epoch = int(state.current_epoch)

        telemetry = build_decision_telemetry(
            state,
            command,
            output,
            events,
            loss_trend,
            latency_ms,
            descriptor,
            risk_reason,
            version,
            self._conservative,
        )
        self._telemetry.append(telemetry)
        return Decision(
            command=command,
            telemetry=telemetry,
            action=output.action,
            policy_output=output,
            events=tuple(e.description for e in events),
            field_report=report,
        )

    # -- helpers ------------------------------------------------------------
    def _new_command(
        self, command_type: leyline_pb2.CommandType.ValueType, target: str
    ) -> leyline_pb2.AdaptationCommand:
        command = leyline_pb2.AdaptationCommand(
            version=1,
            command_id=uuid.uuid4().hex,
            command_type=command_type,
            target_seed_id=target,
            issued_by="tamiyo",
            execution_deadline_ms=self.config.execution_deadline_ms,
        )
        command.issued_at.FromNanoseconds(int(self._clock() * 1e9))
        return command

    @staticmethod
    def _to_pause(command: leyline_pb2.AdaptationCommand) -> None:
        """Turn any command into a PAUSE with no operation payload left to act on."""
        command.command_type = leyline_pb2.COMMAND_PAUSE
        command.ClearField("payload")

    def _lookup(
        self, blueprint_id: str, events: list[TelemetryEvent], base: Mapping[str, str]
    ) -> leyline_pb2.BlueprintDescriptor | None:
        try:
            return self._blueprints.get(blueprint_id)
        except KeyError:
            events.append(TelemetryEvent("bp_unknown", WARNING, {**base, "blueprint_id": blueprint_id}))
        except Exception as exc:  # noqa: BLE001 - any source failure must degrade to "no command"
            _LOG.warning("tamiyo.blueprint_lookup_failed", blueprint_id=blueprint_id, error=repr(exc))
            events.append(
                TelemetryEvent(
                    "bp_metadata_unavailable",
                    WARNING,
                    {**base, "blueprint_id": blueprint_id, "error": repr(exc)},
                )
            )
        return None

    def _close_pending(
        self, run: RunState, state: leyline_pb2.SystemStatePacket
    ) -> leyline_pb2.FieldReport | None:
        """Report the run's previous command, judged by the loss change since it was issued."""
        pending = run.pending
        if pending is None:
            return None
        run.pending = None
        loss_delta = float(state.validation_loss) - pending.validation_loss
        accuracy_delta = float(state.validation_accuracy) - pending.validation_accuracy
        seed_id = pending.command.target_seed_id
        failed = any(s.seed_id == seed_id and s.stage in FAILED_STAGES for s in state.seed_states)
        if failed and seed_id:
            outcome = leyline_pb2.FIELD_REPORT_OUTCOME_ABORTED
        elif loss_delta < -self.config.neutral_loss_band:
            outcome = leyline_pb2.FIELD_REPORT_OUTCOME_SUCCESS
        elif loss_delta > self.config.neutral_loss_band:
            outcome = leyline_pb2.FIELD_REPORT_OUTCOME_REGRESSION
        else:
            outcome = leyline_pb2.FIELD_REPORT_OUTCOME_NEUTRAL
        metrics: dict[str, float] = {
            "loss_delta": loss_delta,
            "accuracy_delta": accuracy_delta,
            "action": float(pending.action),
            "blueprint_index": float(pending.blueprint_index),
        }
        metrics.update(
            {
                FEATURE_METRIC_PREFIX + name: value
                for name, value in zip(FEATURE_NAMES, pending.features, strict=True)
            }
        )
        blueprint = (
            pending.command.seed_operation.blueprint_id if pending.command.HasField("seed_operation") else ""
        )
        return self.generate_field_report(
            pending.command,
            outcome,
            metrics,
            training_run_id=state.training_run_id,
            blueprint_id=blueprint,
            notes=f"action={pending.action.name.lower()}",
        )
