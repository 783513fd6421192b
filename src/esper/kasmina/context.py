"""Per-seed state kept by the manager.

Typed fields instead of esper-lite v1's string metadata dict, so nothing
(telemetry in particular) can quietly overwrite a value a gate reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from esper.kasmina.gates import Gate, GateResult
from esper.kasmina.lifecycle import SeedLifecycle, Stage


@dataclass(slots=True)
class PendingKernel:
    """A kernel request awaiting its answer."""

    blueprint_id: str
    deadline: float
    attempts: int = 1
    # True when the retry is due but could not be sent yet (no event loop).
    retry_due: bool = False


@dataclass(slots=True)
class SeedContext:
    seed_id: str
    lifecycle: SeedLifecycle
    blueprint_id: str = ""
    slot_name: str = ""
    training_run_id: str = ""
    parameters: dict[str, float] = field(default_factory=dict)
    kernel: nn.Module | None = None
    kernel_source: str = ""
    used_fallback: bool = False
    fallback_reason: str = ""
    latency_ms: float = 0.0
    interface_ok: bool = False
    alpha: float = 0.0
    alpha_steps: int = 0
    stage_steps: int = 0
    germinated_epoch: int = 0
    embargo_until: float = 0.0
    isolation_violations: int = 0
    paused: bool = False
    pending: PendingKernel | None = None
    gradient_norm: float = 0.0
    last_gate_results: dict[Gate, GateResult] = field(default_factory=dict)
    last_failure: str = ""

    @property
    def stage(self) -> Stage:
        return self.lifecycle.stage

    @property
    def kernel_attached(self) -> bool:
        return self.kernel is not None
