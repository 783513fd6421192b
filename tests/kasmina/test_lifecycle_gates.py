from __future__ import annotations

from collections.abc import Callable

import pytest

from esper.kasmina import (
    ALLOWED_TRANSITIONS,
    GateInputs,
    IllegalTransition,
    KasminaSeedManager,
    SeedLifecycle,
    evaluate_gate,
)
from esper.leyline import leyline_pb2 as L

from .conftest import events_named, make_host

HAPPY_PATH = [
    L.SEED_STAGE_GERMINATED,
    L.SEED_STAGE_TRAINING,
    L.SEED_STAGE_BLENDING,
    L.SEED_STAGE_SHADOWING,
    L.SEED_STAGE_PROBATIONARY,
    L.SEED_STAGE_FOSSILIZED,
    L.SEED_STAGE_TERMINATED,
]


def test_happy_path_and_recovery_cycle_are_legal() -> None:
    life = SeedLifecycle("s")
    for stage in HAPPY_PATH:
        assert life.transition(stage)
    assert life.stage == L.SEED_STAGE_TERMINATED
    assert ALLOWED_TRANSITIONS[L.SEED_STAGE_TERMINATED] == frozenset()
    life = SeedLifecycle("r", stage=L.SEED_STAGE_TRAINING)
    for stage in (L.SEED_STAGE_CULLED, L.SEED_STAGE_EMBARGOED, L.SEED_STAGE_RESETTING, L.SEED_STAGE_DORMANT):
        life.transition(stage)
    assert life.stage == L.SEED_STAGE_DORMANT
    assert life.transition(L.SEED_STAGE_DORMANT) is False  # moving to the current stage is a no-op


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (L.SEED_STAGE_DORMANT, L.SEED_STAGE_TRAINING),
        (L.SEED_STAGE_GERMINATED, L.SEED_STAGE_BLENDING),
        (L.SEED_STAGE_EMBARGOED, L.SEED_STAGE_DORMANT),
        (L.SEED_STAGE_TERMINATED, L.SEED_STAGE_DORMANT),
        (L.SEED_STAGE_FOSSILIZED, L.SEED_STAGE_CULLED),
    ],
)
def test_illegal_transition_raises_and_reports(start: int, target: int) -> None:
    reported: list[IllegalTransition] = []
    life = SeedLifecycle("s", on_illegal=reported.append, stage=start)  # type: ignore[arg-type]
    with pytest.raises(IllegalTransition):
        life.transition(target)  # type: ignore[arg-type]
    assert life.stage == start
    assert len(reported) == 1
    assert reported[0].target == target


async def test_manager_lifecycle_illegal_move_emits_event(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    manager = make_manager()
    manager.register_host_model(make_host())
    assert await manager.germinate("2", "BP100") == ""
    seed = manager.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_TRAINING
    with pytest.raises(IllegalTransition):
        seed.lifecycle.transition(L.SEED_STAGE_FOSSILIZED)
    [event] = events_named(manager, "illegal_transition")
    assert event == {"seed_id": "2", "current": "TRAINING", "target": "FOSSILIZED"}
    assert seed.stage == L.SEED_STAGE_TRAINING


def _inputs(**kw: object) -> GateInputs:
    base: dict[str, object] = {
        "seed_id": "s",
        "blueprint_id": "BP1",
        "kernel_attached": True,
        "host_registered": True,
        "slot_bound": True,
        "interface_ok": True,
    }
    base.update(kw)
    return GateInputs(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("gate", "inputs", "reason"),
    [
        (L.SEED_GATE_G0_SANITY, _inputs(blueprint_id="  "), "missing blueprint id"),
        (L.SEED_GATE_G0_SANITY, _inputs(parameters={"lr": float("nan")}), "invalid parameter lr"),
        (L.SEED_GATE_G1_GRADIENT_HEALTH, _inputs(kernel_attached=False), "no kernel attached"),
        (L.SEED_GATE_G1_GRADIENT_HEALTH, _inputs(isolation_violations=1), "isolation violations"),
        (L.SEED_GATE_G2_STABILITY, _inputs(latency_ms=12.0), "kernel latency over budget"),
        (L.SEED_GATE_G2_STABILITY, _inputs(seed_output_finite=False), "seed output not finite"),
        (L.SEED_GATE_G3_INTERFACE, _inputs(host_registered=False), "no host model registered"),
        (L.SEED_GATE_G3_INTERFACE, _inputs(interface_ok=False), "kernel interface check failed"),
        (L.SEED_GATE_G4_SYSTEM_IMPACT, _inputs(paused=True), "seed paused"),
        (L.SEED_GATE_G4_SYSTEM_IMPACT, _inputs(isolation_violations=2), "isolation violations"),
        (L.SEED_GATE_G5_RESET, _inputs(), "reset not clean"),
        (L.SEED_GATE_UNKNOWN, _inputs(), "unsupported gate"),
    ],
)
def test_gate_failures_carry_reasons(gate: int, inputs: GateInputs, reason: str) -> None:
    result = evaluate_gate(gate, inputs)  # type: ignore[arg-type]
    assert not result.passed
    assert result.reason == reason


def test_gates_pass_on_clean_inputs() -> None:
    clean = _inputs()
    for gate in (
        L.SEED_GATE_G0_SANITY,
        L.SEED_GATE_G1_GRADIENT_HEALTH,
        L.SEED_GATE_G2_STABILITY,
        L.SEED_GATE_G3_INTERFACE,
        L.SEED_GATE_G4_SYSTEM_IMPACT,
    ):
        assert evaluate_gate(gate, clean).passed, gate
    assert evaluate_gate(L.SEED_GATE_G5_RESET, _inputs(kernel_attached=False)).passed
    g2 = evaluate_gate(L.SEED_GATE_G2_STABILITY, _inputs(latency_ms=12.345))
    assert g2.attributes == {"latency_ms": "12.35", "budget_ms": "10.00"}


async def test_gates_are_read_only_and_telemetry_does_not_change_them(
    make_manager: Callable[..., KasminaSeedManager],
) -> None:
    manager = make_manager()
    manager.register_host_model(make_host())
    await manager.germinate("2", "BP100")
    before = {
        g: manager.evaluate_gate("2", g) for g in (L.SEED_GATE_G2_STABILITY, L.SEED_GATE_G4_SYSTEM_IMPACT)
    }
    for _ in range(3):
        manager.build_telemetry()
    after = {g: manager.evaluate_gate("2", g) for g in before}
    assert before == after
    assert all(r.passed for r in after.values())
