"""A run with no graft says why, from what the run saw."""

from __future__ import annotations

import pytest

from esper.grow import GrowthRun
from esper.leyline import leyline_pb2
from esper.tolaria import CommandRecord, ControllerDecision, EpochResult, SeedSummary

GERMINATE = "SEED_OP_GERMINATE"


def epoch(
    n: int,
    *,
    commands: tuple[CommandRecord, ...] = (),
    decision: ControllerDecision | None = None,
    grafted: tuple[str, ...] = (),
) -> EpochResult:
    seeds = [
        SeedSummary(g.split(":")[0], "SEED_STAGE_BLENDING", leyline_pb2.SEED_STAGE_BLENDING, 0.5, "BP002", 0)
        for g in grafted
    ]
    return EpochResult(
        epoch=n,
        global_step=n,
        train_loss=1.0,
        train_accuracy=None,
        validation_loss=1.0,
        validation_accuracy=None,
        gradient_norm=1.0,
        latency_ms=1.0,
        samples_per_s=1.0,
        seeds=seeds,
        grafted=list(grafted),
        commands=list(commands),
        state=leyline_pb2.SystemStatePacket(),
        published=True,
        decision=decision,
    )


def germinate(status: str = "applied", reason: str = "") -> CommandRecord:
    return CommandRecord("c1", "COMMAND_SEED", GERMINATE, "seed-1", status, reason)


def deferred() -> ControllerDecision:
    return ControllerDecision(
        "germinate",
        "germination_deferred",
        ("germination_deferred: no free seed slot in the model",),
        1.0,
        False,
    )


CASES = {
    "grafted": ([epoch(1), epoch(2, grafted=("seed-1:BP002",))], {}, ""),
    "no epochs": ([], {}, "no epoch ran"),
    "one epoch": ([epoch(1)], {}, "1-epoch run cannot graft"),
    "refused": ([epoch(1, commands=(germinate("rejected", "slot_occupied"),)), epoch(2)], {}, "refused"),
    "culled": (
        [epoch(1), epoch(2)],
        {"seed-1": "G3_INTERFACE: kernel interface check failed"},
        "seed-1 failed",
    ),
    "too late": ([epoch(1), epoch(2, commands=(germinate(),))], {}, "after the last epoch"),
    "deferred": (
        [epoch(1, decision=deferred()), epoch(2, decision=deferred())],
        {},
        "no free seed slot in the model) (2 epochs)",
    ),
    "silent": ([epoch(1), epoch(2)], {}, "did not answer any epoch within 5s"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_graft_reason(case: str) -> None:
    results, failures, expected = CASES[case]
    run = GrowthRun("run", results, 1.0, 5.0, failures)
    reason = run.no_graft_reason()
    if expected:
        assert expected in reason
        assert not run.grafted
    else:
        assert reason == ""
        assert run.grafts == ["epoch 2: seed-1:BP002"]
