"""KasminaSeedManager: the public face of Kasmina.

Adds to :class:`~esper.kasmina.core.SeedManagerCore` what callers drive:
the training-loop hooks (:meth:`step`, :meth:`update_epoch`), operator actions
(retire, pause, resume, breaker, emergency cleanup), command intake
(:meth:`handle_command`, verified before anything changes) and telemetry
(:meth:`build_telemetry`, :meth:`drain_telemetry`).
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass

from esper.core.telemetry import PRIORITY_INDICATOR, TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.kasmina.acquisition import KernelAcquisition
from esper.kasmina.commands import dispatch_command
from esper.kasmina.context import SeedContext
from esper.kasmina.core import CRITICAL, INFO, WARNING
from esper.kasmina.lifecycle import ACTIVE_STAGES, stage_name
from esper.kasmina.telemetry import packet_level, packet_priority, priority_name
from esper.leyline import leyline_pb2

_L = leyline_pb2
RUN_ANNOTATION = "training_run_id"


@dataclass(frozen=True, slots=True)
class CommandResult:
    """``status`` is ``applied``, ``rejected`` (see ``reason``) or ``ignored`` (another run)."""

    status: str
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.status == "applied"


class KasminaSeedManager(KernelAcquisition):
    """Seeds of one training run; see :mod:`esper.kasmina.core` for the stage schedule."""

    # ------------------------------------------------------------- training loop
    def step(self, n: int = 1) -> None:
        """Call once per training batch (after backward): expire embargoes and
        kernel requests, verify isolation, advance alpha and stages."""
        for _ in range(max(0, n)):
            self._housekeeping(self._clock())
            for ctx in list(self._seeds.values()):
                if ctx.paused or ctx.kernel is None or ctx.stage not in ACTIVE_STAGES:
                    continue
                if self._host is not None and not self.verify_isolation(ctx.seed_id).isolated:
                    continue
                ctx.gradient_norm = _grad_norm(ctx)
                self._progress(ctx)

    def _progress(self, ctx: SeedContext) -> None:
        ctx.stage_steps += 1
        stage = ctx.stage
        if stage == _L.SEED_STAGE_TRAINING and ctx.stage_steps >= self.training_steps:
            self._advance(ctx, _L.SEED_GATE_G2_STABILITY, _L.SEED_STAGE_BLENDING)
        elif stage == _L.SEED_STAGE_BLENDING:
            ctx.alpha_steps += 1
            self._set_alpha(ctx, self.alpha_schedule.alpha(ctx.alpha_steps))
            if self.alpha_schedule.finished(ctx.alpha_steps):
                self._advance(ctx, _L.SEED_GATE_G3_INTERFACE, _L.SEED_STAGE_SHADOWING)
        elif stage == _L.SEED_STAGE_SHADOWING and ctx.stage_steps >= self.shadowing_steps:
            self._advance(ctx, _L.SEED_GATE_G4_SYSTEM_IMPACT, _L.SEED_STAGE_PROBATIONARY)

    def awaiting_kernels(self) -> list[str]:
        """Seeds whose kernel request is still unanswered (they graft once it is settled)."""
        return [ctx.seed_id for ctx in self._seeds.values() if ctx.pending is not None]

    def update_epoch(self, epoch: int) -> None:
        """Record the global epoch (ages are counted from each seed's germination)."""
        if epoch < 0:
            raise ValueError("epoch must be non-negative")
        self._epoch = epoch
        self._housekeeping(self._clock())

    def export_seed_states(self) -> list[leyline_pb2.SeedState]:
        states = []
        order = list(self._slots)
        for ctx in self._seeds.values():
            state = leyline_pb2.SeedState(
                seed_id=ctx.seed_id,
                stage=ctx.stage,
                gradient_norm=ctx.gradient_norm,
                age_epochs=max(0, self._epoch - ctx.germinated_epoch),
                layer_depth=order.index(ctx.slot_name) if ctx.slot_name in order else 0,
            )
            state.metrics.update(
                {
                    "alpha": ctx.alpha,
                    "alpha_steps": float(ctx.alpha_steps),
                    "isolation_violations": float(ctx.isolation_violations),
                    "kernel_latency_ms": ctx.latency_ms,
                    "used_fallback": float(ctx.used_fallback),
                    "paused": float(ctx.paused),
                }
            )
            states.append(state)
        return states

    # ----------------------------------------------------------- operator actions
    def retire(self, seed_id: str, reason: str = "retired") -> bool:
        """Remove a seed and its kernel, evicting its blueprint from the kernel cache.

        The blueprint id is read *before* anything is cleared.
        A seed still under embargo is cleaned but stays EMBARGOED until the
        embargo passes, so retiring cannot be used to dodge an embargo.
        """
        ctx = self._seeds.get(seed_id)
        if ctx is None:
            return False
        blueprint_id = ctx.blueprint_id
        self._unbind(ctx)
        ctx.isolation_violations = 0
        evicted = bool(blueprint_id) and self.kernel_cache.evict(blueprint_id)
        retired = {
            "seed_id": seed_id,
            "blueprint_id": blueprint_id,
            "reason": reason,
            "evicted": str(evicted).lower(),
        }
        now = self._clock()
        if ctx.stage == _L.SEED_STAGE_EMBARGOED and now < ctx.embargo_until:
            self.emit("seed_retired", INFO, **retired, embargo_remaining_s=f"{ctx.embargo_until - now:.1f}")
            return True
        if ctx.stage == _L.SEED_STAGE_FOSSILIZED:
            self._transition(ctx, _L.SEED_STAGE_TERMINATED)
        else:
            if ctx.stage in ACTIVE_STAGES or ctx.stage == _L.SEED_STAGE_GERMINATED:
                self._transition(ctx, _L.SEED_STAGE_CULLED)
            if ctx.stage == _L.SEED_STAGE_CULLED:
                self._transition(ctx, _L.SEED_STAGE_EMBARGOED)
            if ctx.stage == _L.SEED_STAGE_EMBARGOED:
                self._reset(ctx)
        del self._seeds[seed_id]
        self.emit("seed_retired", INFO, **retired)
        return True

    def pause(self, seed_id: str) -> bool:
        """Take the seed out of the forward pass (output = host) and freeze its schedule.

        The kernel and its trained weights are kept for :meth:`resume`.
        """
        ctx = self._seeds.get(seed_id)
        if ctx is None or ctx.paused:
            return False
        ctx.paused = True
        slot = self._slots.get(ctx.slot_name)
        if slot is not None:
            slot.paused = True
        self.emit("seed_paused", WARNING, seed_id=seed_id, stage=stage_name(ctx.stage))
        return True

    def resume(self, seed_id: str) -> bool:
        """Put a paused seed back, re-checking isolation and G1 first."""
        ctx = self._seeds.get(seed_id)
        if ctx is None or not ctx.paused:
            return False
        ctx.paused = False
        slot = self._slots.get(ctx.slot_name)
        if slot is not None:
            slot.paused = False
        self.emit("seed_resumed", INFO, seed_id=seed_id, blueprint_id=ctx.blueprint_id)
        if ctx.kernel is not None and ctx.stage in ACTIVE_STAGES:
            if not self.verify_isolation(seed_id).isolated:
                return True
            result = self._gate(ctx, _L.SEED_GATE_G1_GRADIENT_HEALTH)
            if not result.passed:
                self._fail(ctx, result.name, result.reason)
        return True

    def force_breaker(self, desired: leyline_pb2.CircuitBreakerState.ValueType, rationale: str = "") -> bool:
        before = self.breaker.state
        if not self.breaker.force(desired):
            self.emit("breaker_command_invalid", WARNING, desired=str(desired))
            return False
        self.emit(
            "breaker_event",
            INFO,
            seed_id="kasmina",
            reason=rationale or "command",
            **{
                "from": _L.CircuitBreakerState.Name(before),
                "to": _L.CircuitBreakerState.Name(self.breaker.state),
            },
        )
        return True

    def emergency_cleanup(self) -> dict[str, int]:
        stats = {"kernel_cache_cleared": self.kernel_cache.clear(), "python_gc_collected": gc.collect()}
        self.emit("emergency_cleanup", CRITICAL, **stats)
        return stats

    # -------------------------------------------------------------- command intake
    async def handle_command(self, command: leyline_pb2.AdaptationCommand) -> CommandResult:
        """Verify, then dispatch. Rejections change nothing but counters."""
        self._housekeeping(self._clock())
        await self._flush_retries()
        reason = self.verifier.verify(command)
        if reason:
            self.record_rejection(reason, command.command_id)
            result = CommandResult("rejected", reason)
        else:
            run = command.annotations.get(RUN_ANNOTATION, "")
            if self.training_run_id and run and run != self.training_run_id:
                self.ignored_commands += 1
                self.emit("command_ignored", INFO, command_id=command.command_id, training_run_id=run)
                result = CommandResult("ignored", "other_training_run")
            else:
                reason = await dispatch_command(self, command)
                result = CommandResult("rejected", reason) if reason else CommandResult("applied")
                if not reason:
                    self.accepted_commands += 1
        if len(self._events):
            self.build_telemetry()
        return result

    apply_command = handle_command

    # ------------------------------------------------------------------- telemetry
    def health(self) -> tuple[leyline_pb2.HealthStatus.ValueType, str]:
        """Health from current state only (nothing here mutates a seed)."""
        if any(ctx.isolation_violations > 0 for ctx in self._seeds.values()):
            return _L.HEALTH_STATUS_UNHEALTHY, "isolation_violations"
        if self.breaker.state == _L.CIRCUIT_STATE_OPEN:
            return _L.HEALTH_STATUS_DEGRADED, "breaker_open"
        if any(ctx.used_fallback and ctx.kernel is not None for ctx in self._seeds.values()):
            return _L.HEALTH_STATUS_DEGRADED, "fallback"
        return _L.HEALTH_STATUS_HEALTHY, "nominal"

    def _metrics(self) -> list[TelemetryMetric]:
        cache = self.kernel_cache
        active = sum(
            1 for c in self._seeds.values() if c.stage in ACTIVE_STAGES or c.stage == _L.SEED_STAGE_GERMINATED
        )
        metrics = [
            TelemetryMetric("kasmina.seeds.active", active, "count"),
            TelemetryMetric("kasmina.seeds.total", len(self._seeds), "count"),
            TelemetryMetric(
                "kasmina.isolation.violations",
                sum(c.isolation_violations for c in self._seeds.values()),
                "count",
            ),
            TelemetryMetric("kasmina.isolation.violations_total", self.violations_total, "count"),
            TelemetryMetric("kasmina.kernel.fetch_latency_ms", self.last_fetch_latency_ms, "ms"),
            TelemetryMetric("kasmina.breaker.state", float(self.breaker.state), "state"),
            TelemetryMetric("kasmina.breaker.failures", self.breaker.failures, "count"),
            TelemetryMetric("kasmina.cache.kernel_size", len(cache), "count"),
            TelemetryMetric("kasmina.cache.kernel_capacity", cache.capacity, "count"),
            TelemetryMetric("kasmina.cache.kernel_hit_rate", cache.hit_rate, "ratio"),
            TelemetryMetric("kasmina.cache.kernel_evictions", cache.evictions, "count"),
            TelemetryMetric("kasmina.commands.accepted_total", self.accepted_commands, "count"),
            TelemetryMetric("kasmina.commands.ignored_total", self.ignored_commands, "count"),
            TelemetryMetric("kasmina.telemetry.dropped_total", self._packets.dropped, "count"),
            TelemetryMetric("kasmina.events.dropped_total", self._events.dropped, "count"),
        ]
        metrics.extend(
            TelemetryMetric("kasmina.commands.rejected_total", count, "count", {"reason": reason})
            for reason, count in sorted(self.rejections.items())
        )
        return metrics

    def build_telemetry(self, events: Iterable[TelemetryEvent] = ()) -> leyline_pb2.TelemetryPacket:
        """Build a packet from queued + given events and current state, and buffer it.

        The priority (``system_health.indicators["priority"]``) depends on
        this packet's events only.
        """
        packet_events = [*self._events.drain(), *events]
        packet_events.extend(
            TelemetryEvent(
                "seed_stage",
                INFO,
                {"seed_id": c.seed_id, "stage": stage_name(c.stage), "alpha": f"{c.alpha:.4f}"},
            )
            for c in self._seeds.values()
        )
        status, summary = self.health()
        self._packet_counter += 1
        packet = build_telemetry_packet(
            source="kasmina",
            packet_id=f"kasmina-telemetry-{self._packet_counter}",
            level=packet_level(packet_events),
            metrics=self._metrics(),
            events=packet_events,
            health_status=status,
            health_summary=summary,
            health_indicators={
                PRIORITY_INDICATOR: priority_name(packet_priority(packet_events)),
                "seeds": str(len(self._seeds)),
                "training_run_id": self.training_run_id,
            },
        )
        self._packets.append(packet)
        return packet

    def drain_telemetry(self) -> list[leyline_pb2.TelemetryPacket]:
        """Return and clear the buffered packets (oldest first)."""
        return self._packets.drain()

    @property
    def telemetry_packets(self) -> list[leyline_pb2.TelemetryPacket]:
        return self._packets.snapshot()

    @property
    def telemetry_dropped(self) -> int:
        return self._packets.dropped


def _grad_norm(ctx: SeedContext) -> float:
    if ctx.kernel is None:
        return 0.0
    total = 0.0
    for param in ctx.kernel.parameters():
        if param.grad is not None:
            total += float(param.grad.detach().pow(2).sum())
    return float(total**0.5)
