"""Lifecycle gates G0-G5, as pure functions of a seed's state.

Esper-lite v1's G4 read a ``performance_status`` that *telemetry building*
overwrote, so merely observing the manager changed what the
next gate decided. Here the manager snapshots the facts into
:class:`GateInputs` and :func:`evaluate_gate` only reads them: evaluating a
gate, or building telemetry, never changes state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeAlias

from esper.leyline import leyline_pb2

Gate: TypeAlias = leyline_pb2.SeedLifecycleGate.ValueType


@dataclass(frozen=True, slots=True)
class GateInputs:
    seed_id: str
    blueprint_id: str
    parameters: Mapping[str, float] = field(default_factory=dict)
    kernel_attached: bool = False
    isolation_violations: int = 0
    latency_ms: float = 0.0
    latency_budget_ms: float = 10.0
    host_registered: bool = False
    slot_bound: bool = False
    interface_ok: bool = False
    seed_output_finite: bool = True
    paused: bool = False


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: Gate
    passed: bool
    reason: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return leyline_pb2.SeedLifecycleGate.Name(self.gate).removeprefix("SEED_GATE_")


def _g0(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    if not i.blueprint_id.strip():
        return False, "missing blueprint id", {}
    for name, value in i.parameters.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False, f"invalid parameter {name}", {"parameter": name}
    return True, "", {}


def _g1(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    if not i.kernel_attached:
        return False, "no kernel attached", {}
    if i.isolation_violations > 0:
        return False, "isolation violations", {"violations": str(i.isolation_violations)}
    return True, "", {}


def _g2(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    attrs = {"latency_ms": f"{i.latency_ms:.2f}", "budget_ms": f"{i.latency_budget_ms:.2f}"}
    if i.latency_ms > i.latency_budget_ms:
        return False, "kernel latency over budget", attrs
    if not i.seed_output_finite:
        return False, "seed output not finite", attrs
    return True, "", attrs


def _g3(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    if not i.host_registered:
        return False, "no host model registered", {}
    if not i.slot_bound:
        return False, "seed is not bound to a slot", {}
    if not i.interface_ok:
        return False, "kernel interface check failed", {}
    return True, "", {}


def _g4(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    if i.isolation_violations > 0:
        return False, "isolation violations", {"violations": str(i.isolation_violations)}
    if not i.seed_output_finite:
        return False, "seed output not finite", {}
    if i.paused:
        return False, "seed paused", {}
    return True, "", {}


def _g5(i: GateInputs) -> tuple[bool, str, dict[str, str]]:
    if i.kernel_attached or i.isolation_violations > 0:
        return (
            False,
            "reset not clean",
            {
                "kernel_attached": str(i.kernel_attached).lower(),
                "violations": str(i.isolation_violations),
            },
        )
    return True, "", {}


_GATES = {
    leyline_pb2.SEED_GATE_G0_SANITY: _g0,
    leyline_pb2.SEED_GATE_G1_GRADIENT_HEALTH: _g1,
    leyline_pb2.SEED_GATE_G2_STABILITY: _g2,
    leyline_pb2.SEED_GATE_G3_INTERFACE: _g3,
    leyline_pb2.SEED_GATE_G4_SYSTEM_IMPACT: _g4,
    leyline_pb2.SEED_GATE_G5_RESET: _g5,
}


def evaluate_gate(gate: Gate, inputs: GateInputs) -> GateResult:
    """Evaluate one gate; an unknown gate fails with ``unsupported gate``."""
    check = _GATES.get(gate)
    if check is None:
        return GateResult(gate, False, "unsupported gate")
    passed, reason, attrs = check(inputs)
    return GateResult(gate, passed, reason, attrs)
