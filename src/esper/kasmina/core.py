"""The seed manager's core: state, lifecycle moves, gates, isolation and events.

Layers: this core, then :mod:`esper.kasmina.acquisition` (germination and
the kernel request/answer protocol), then
:class:`~esper.kasmina.seed_manager.KasminaSeedManager` (training-loop hooks,
operator actions, command intake, telemetry).

Bus-independent by design: kernels arrive through an injected
:class:`~esper.kasmina.providers.KernelProvider` and commands through
:meth:`KasminaSeedManager.handle_command`, so the same core runs in local
training and behind Oona.

Progress schedule (all driven by :meth:`step`, one call per training batch)::

    GERMINATED --kernel attached, G1--> TRAINING       (alpha 0: kernel runs, is checked, output unused)
    TRAINING   --training_steps, G2--> BLENDING        (alpha follows AlphaSchedule, +1 step per batch)
    BLENDING   --schedule done, G3--> SHADOWING        (alpha 1.0)
    SHADOWING  --shadowing_steps, G4--> PROBATIONARY   (stays there; fossilisation is a later decision)

A failed gate or an isolation violation culls the seed and embargoes it for
``embargo_seconds``; once that passes (checked on every step, epoch and
command) it is reset (RESETTING, G5) to DORMANT and may be germinated again.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeAlias, cast

import torch
from torch import nn

from esper.core.breaker import CircuitBreaker
from esper.core.logs import get_logger
from esper.core.telemetry import TelemetryEvent
from esper.kasmina.blending import AlphaSchedule
from esper.kasmina.context import SeedContext
from esper.kasmina.gates import Gate, GateInputs, GateResult, evaluate_gate
from esper.kasmina.isolation import IsolationReport, shared_parameters
from esper.kasmina.kernel_cache import KernelCache
from esper.kasmina.lifecycle import IllegalTransition, SeedLifecycle, Stage, stage_name
from esper.kasmina.providers import BlueprintRuntime, KernelProvider, KernelSink, LocalKernelProvider
from esper.kasmina.slot import SeedSlot
from esper.kasmina.telemetry import (
    BoundedBuffer,
)
from esper.kasmina.verification import CommandVerifier
from esper.leyline import leyline_pb2
from esper.security import KeyRing

_log = get_logger(__name__)
_L = leyline_pb2
INFO, WARNING, ERROR, CRITICAL = (
    _L.TELEMETRY_LEVEL_INFO,
    _L.TELEMETRY_LEVEL_WARNING,
    _L.TELEMETRY_LEVEL_ERROR,
    _L.TELEMETRY_LEVEL_CRITICAL,
)
Level: TypeAlias = leyline_pb2.TelemetryLevel.ValueType


class SeedManagerCore:
    """Owns every seed of one training run (see the module docstring for the schedule)."""

    def __init__(
        self,
        *,
        runtime: BlueprintRuntime | None = None,
        kernel_provider: KernelProvider | None = None,
        keys: KeyRing | None = None,
        training_run_id: str = "",
        blueprint_lookup: Callable[[str], object] | None = None,
        latency_budget_ms: float = 10.0,
        fallback_blueprint_id: str = "BP001",
        embargo_seconds: float = 30.0,
        prefetch_timeout_seconds: float = 5.0,
        prefetch_retries: int = 1,
        freshness_window_seconds: float = 60.0,
        nonce_ttl_seconds: float = 300.0,
        kernel_cache_capacity: int = 32,
        alpha_schedule: AlphaSchedule | None = None,
        training_steps: int = 5,
        shadowing_steps: int = 5,
        telemetry_buffer_size: int = 256,
        event_buffer_size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.runtime = runtime
        self.training_run_id = training_run_id
        self.blueprint_lookup = blueprint_lookup
        self.latency_budget_ms = latency_budget_ms
        self.fallback_blueprint_id = fallback_blueprint_id
        self.embargo_seconds = embargo_seconds
        self.prefetch_timeout_seconds = prefetch_timeout_seconds
        self.prefetch_retries = prefetch_retries
        self.alpha_schedule = alpha_schedule or AlphaSchedule()
        self.training_steps = training_steps
        self.shadowing_steps = shadowing_steps
        self._clock = clock
        # 3 failures open it for 60 s; 2 successes while half-open close it (esper-lite v1 values).
        self.breaker = CircuitBreaker(
            "kasmina.kernels", failure_threshold=3, success_threshold=2, open_s=60.0, clock=clock
        )
        self.kernel_cache = KernelCache(kernel_cache_capacity)
        self.verifier = CommandVerifier(
            keys,
            freshness_window_seconds=freshness_window_seconds,
            nonce_ttl_seconds=nonce_ttl_seconds,
            clock=clock,
            wall_clock=wall_clock,
        )
        if keys is None:
            _log.warning("kasmina has no signing keys: every command will be rejected")
        if kernel_provider is None and runtime is not None:
            # Subclasses implement the sink methods (KernelAcquisition).
            kernel_provider = LocalKernelProvider(runtime, cast(KernelSink, self))
        self.kernel_provider = kernel_provider
        self._seeds: dict[str, SeedContext] = {}
        self._host: nn.Module | None = None
        self._slots: dict[str, SeedSlot] = {}
        self._epoch = 0
        self._events: BoundedBuffer[TelemetryEvent] = BoundedBuffer(event_buffer_size)
        self._packets: BoundedBuffer[leyline_pb2.TelemetryPacket] = BoundedBuffer(telemetry_buffer_size)
        self._packet_counter = 0
        self.rejections: Counter[str] = Counter()
        self.ignored_commands = 0
        self.accepted_commands = 0
        self.violations_total = 0
        self.last_fetch_latency_ms = 0.0

    # ------------------------------------------------------------------ wiring
    def set_kernel_provider(self, provider: KernelProvider | None) -> None:
        """Install the provider GERMINATE asks (the bus coordinator, typically)."""
        self.kernel_provider = provider

    def register_host_model(self, model: nn.Module) -> dict[str, SeedSlot]:
        """Adopt ``model``'s :class:`SeedSlot`\\ s (by slot name) and re-bind live kernels."""
        self._host = model
        self._slots = {
            (module.slot_name or name): module
            for name, module in model.named_modules()
            if isinstance(module, SeedSlot)
        }
        for ctx in self._seeds.values():
            slot = self._slots.get(ctx.slot_name)
            if slot is not None and ctx.kernel is not None:
                slot.attach(ctx.kernel)
                ctx.kernel = slot.kernel
                slot.alpha = ctx.alpha
                slot.paused = ctx.paused
                ctx.interface_ok = _probe_interface(ctx.kernel, slot.dim) if ctx.kernel is not None else False
        return dict(self._slots)

    @property
    def host_model(self) -> nn.Module | None:
        return self._host

    @property
    def seeds(self) -> Mapping[str, SeedContext]:
        return MappingProxyType(self._seeds)

    def get_seed(self, seed_id: str) -> SeedContext | None:
        return self._seeds.get(seed_id)

    def slot_for(self, seed_id: str) -> SeedSlot | None:
        ctx = self._seeds.get(seed_id)
        return None if ctx is None else self._slots.get(ctx.slot_name)

    def seed_parameters(self, seed_id: str | None = None) -> list[nn.Parameter]:
        """Kernel parameters (of one seed, or all) for the trainer's seed optimizer."""
        chosen = [self._seeds[seed_id]] if seed_id is not None else list(self._seeds.values())
        return [p for ctx in chosen if ctx.kernel is not None for p in ctx.kernel.parameters()]

    @property
    def current_epoch(self) -> int:
        return self._epoch

    # ------------------------------------------------------------------ events
    def emit(self, description: str, level: Level = INFO, **attributes: object) -> None:
        """Queue an event for the next telemetry packet."""
        self._events.append(TelemetryEvent(description, level, {k: str(v) for k, v in attributes.items()}))

    @property
    def pending_events(self) -> list[TelemetryEvent]:
        return self._events.snapshot()

    def record_rejection(self, reason: str, command_id: str = "", **attributes: object) -> None:
        """Count and report a refused command or request (it changes nothing else)."""
        self.rejections[reason] += 1
        self.emit("command_rejected", ERROR, reason=reason, command_id=command_id, **attributes)

    # --------------------------------------------------------------- lifecycle
    def _new_context(self, seed_id: str) -> SeedContext:
        def report(error: IllegalTransition) -> None:
            self.emit(
                "illegal_transition",
                ERROR,
                seed_id=error.seed_id,
                current=stage_name(error.current),
                target=stage_name(error.target),
            )

        return SeedContext(seed_id=seed_id, lifecycle=SeedLifecycle(seed_id, on_illegal=report))

    def _transition(self, ctx: SeedContext, target: Stage) -> None:
        previous = ctx.stage
        if ctx.lifecycle.transition(target):
            ctx.stage_steps = 0
            if target == _L.SEED_STAGE_DORMANT:
                self._set_alpha(ctx, 0.0)
                ctx.alpha_steps = 0
            elif target in (_L.SEED_STAGE_SHADOWING, _L.SEED_STAGE_PROBATIONARY):
                self._set_alpha(ctx, 1.0)
            self.emit(
                "stage_transition",
                INFO,
                seed_id=ctx.seed_id,
                **{"from": stage_name(previous), "to": stage_name(target)},
            )

    def _set_alpha(self, ctx: SeedContext, alpha: float) -> None:
        ctx.alpha = alpha
        slot = self._slots.get(ctx.slot_name)
        if slot is not None and slot.kernel is not None and slot.kernel is ctx.kernel:
            slot.alpha = alpha

    def gate_inputs(self, seed_id: str) -> GateInputs:
        ctx = self._seeds[seed_id]
        slot = self._slots.get(ctx.slot_name)
        return GateInputs(
            seed_id=ctx.seed_id,
            blueprint_id=ctx.blueprint_id,
            parameters=dict(ctx.parameters),
            kernel_attached=ctx.kernel is not None,
            isolation_violations=ctx.isolation_violations,
            latency_ms=ctx.latency_ms,
            latency_budget_ms=self.latency_budget_ms,
            host_registered=self._host is not None,
            slot_bound=slot is not None,
            interface_ok=ctx.interface_ok,
            seed_output_finite=slot.last_seed_output_finite if slot is not None else True,
            paused=ctx.paused,
        )

    def evaluate_gate(self, seed_id: str, gate: Gate) -> GateResult:
        """Evaluate a gate against current state; records nothing, changes nothing."""
        return evaluate_gate(gate, self.gate_inputs(seed_id))

    def _gate(self, ctx: SeedContext, gate: Gate) -> GateResult:
        result = self.evaluate_gate(ctx.seed_id, gate)
        ctx.last_gate_results[gate] = result
        self.emit(
            "gate_event",
            INFO if result.passed else WARNING,
            seed_id=ctx.seed_id,
            gate=result.name,
            passed=str(result.passed).lower(),
            reason=result.reason,
            **result.attributes,
        )
        return result

    def _advance(self, ctx: SeedContext, gate: Gate, target: Stage) -> bool:
        result = self._gate(ctx, gate)
        if result.passed:
            self._transition(ctx, target)
            return True
        self._fail(ctx, result.name, result.reason)
        return False

    def _unbind(self, ctx: SeedContext) -> None:
        slot = self._slots.get(ctx.slot_name)
        if slot is not None and ctx.kernel is not None and slot.kernel is ctx.kernel:
            slot.detach_kernel()
        ctx.kernel = None
        ctx.pending = None
        ctx.paused = False
        ctx.used_fallback = False
        ctx.interface_ok = False

    def _fail(self, ctx: SeedContext, gate: str, reason: str) -> None:
        """Gate-failure path: cull, then embargo until ``now + embargo_seconds``."""
        self._unbind(ctx)
        ctx.last_failure = f"{gate}: {reason}"
        ctx.embargo_until = self._clock() + self.embargo_seconds
        self.emit("gate_failure", WARNING, seed_id=ctx.seed_id, gate=gate, reason=reason)
        self._transition(ctx, _L.SEED_STAGE_CULLED)
        self._transition(ctx, _L.SEED_STAGE_EMBARGOED)
        if self.embargo_seconds <= 0:
            self._reset(ctx)

    def _reset(self, ctx: SeedContext) -> None:
        """EMBARGOED -> RESETTING -> (G5) DORMANT; the violation count restarts (recovery)."""
        self._transition(ctx, _L.SEED_STAGE_RESETTING)
        self._unbind(ctx)
        ctx.isolation_violations = 0
        ctx.alpha_steps = 0
        if self._gate(ctx, _L.SEED_GATE_G5_RESET).passed:
            self._transition(ctx, _L.SEED_STAGE_DORMANT)
            self.emit("embargo_released", INFO, seed_id=ctx.seed_id, blueprint_id=ctx.blueprint_id)

    # ----------------------------------------------------------------- isolation
    def verify_isolation(self, seed_id: str) -> IsolationReport:
        """Check the seed's kernel shares nothing with the host and pulls no host leaf into its graph.

        The graph check uses the leaves the slot saw on its last training
        forward. A violation is counted on the seed, reported and acted on
        (cull, then embargo).
        """
        ctx = self._seeds[seed_id]
        kernel = ctx.kernel
        if kernel is None:
            return IsolationReport(seed_id, True, reason="no kernel")
        foreign: list[torch.Tensor] = []
        if self._host is not None:
            foreign.extend(self._host.parameters())
        for other in self._seeds.values():
            if other is not ctx and other.kernel is not None:
                foreign.extend(other.kernel.parameters())
        shared = shared_parameters(kernel, foreign)
        leaves = 0
        slot = self._slots.get(ctx.slot_name)
        if slot is not None and self._host is not None and slot.kernel is kernel:
            kernel_ids = {id(p) for p in kernel.parameters()}
            host_ids = {id(p) for p in self._host.parameters()} - kernel_ids
            leaves = len(slot.last_seed_leaf_ids & host_ids)
        if not shared and not leaves:
            return IsolationReport(seed_id, True)
        reason = "shared_parameters" if shared else "host_gradient_through_seed"
        report = IsolationReport(seed_id, False, shared, leaves, reason)
        ctx.isolation_violations += 1
        self.violations_total += 1
        self.emit(
            "isolation_violation",
            WARNING,
            seed_id=seed_id,
            blueprint_id=ctx.blueprint_id,
            reason=reason,
            shared_parameters=shared,
            host_leaves=leaves,
            violations=ctx.isolation_violations,
        )
        self._fail(ctx, "G1_GRADIENT_HEALTH", f"isolation violation: {reason}")
        return report


def _probe_interface(kernel: nn.Module, dim: int) -> bool:
    """Does ``kernel`` map ``[2, dim]`` to ``[2, dim]``? Run in eval mode without grad, so
    the probe cannot update running statistics or build a graph."""
    device = next((p.device for p in kernel.parameters()), torch.device("cpu"))
    was_training = kernel.training
    kernel.eval()
    try:
        with torch.no_grad():
            out = kernel(torch.zeros(2, dim, device=device))
        return isinstance(out, torch.Tensor) and tuple(out.shape) == (2, dim)
    except Exception:  # noqa: BLE001 - any failure of the probe means "interface not ok"
        return False
    finally:
        kernel.train(was_training)
