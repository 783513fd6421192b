"""Reading the controller's decisions: the real Tamiyo's telemetry, over a real bus."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.kasmina import KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing
from esper.tamiyo import (
    ControllerConfig,
    PolicyAction,
    PolicyConfig,
    StaticBlueprintMetadata,
    TamiyoController,
    TamiyoPolicy,
    TamiyoPolicyRegistry,
    TamiyoService,
)
from esper.tolaria import ControllerDecision, DecisionReader, TolariaTrainer, TrainingConfig
from esper.tolaria.decisions import decision_from_packet

_L = leyline_pb2
SECRET = b"tolaria-decisions-secret-0123456789abcdef"
RUN = "run-decisions"


def controller(action: PolicyAction, *, conservative: bool = False) -> TamiyoController:
    """The real controller with a policy that always picks ``action`` (and BP003)."""
    base = TamiyoPolicy(PolicyConfig(seed=0))
    weights = dict(base.weights)
    for head, pick in (("action_head", int(action)), ("blueprint_head", 1)):
        weights[f"{head}.weight"] = np.zeros_like(weights[f"{head}.weight"])
        bias = np.full_like(weights[f"{head}.bias"], -5.0)
        bias[pick] = 5.0
        weights[f"{head}.bias"] = bias
    return TamiyoController(
        KeyRing(SECRET),
        StaticBlueprintMetadata(KarnCatalog().all()),
        registry=TamiyoPolicyRegistry(TamiyoPolicy(base.config, weights)),
        config=ControllerConfig(conservative_mode=conservative),
    )


def state(
    loss: float = 1.0, *, seeds: tuple[tuple[str, int], ...] = (), free_slots: float | None = None
) -> leyline_pb2.SystemStatePacket:
    packet = leyline_pb2.SystemStatePacket(
        version=1, current_epoch=1, validation_loss=loss, training_loss=loss, training_run_id=RUN
    )
    for seed_id, stage in seeds:
        packet.seed_states.add(seed_id=seed_id, stage=stage)  # type: ignore[arg-type]
    if free_slots is not None:
        packet.training_metrics["seed_slots_free"] = free_slots
    return packet


TRAINING = ("seed-1", _L.SEED_STAGE_TRAINING)
CASES = {
    "germinate": (PolicyAction.GERMINATE, False, [state()]),
    "germinate_deferred_in_flight": (PolicyAction.GERMINATE, False, [state(seeds=(TRAINING,))]),
    "germinate_deferred_no_slot": (PolicyAction.GERMINATE, False, [state(free_slots=0.0)]),
    "no_op": (PolicyAction.NO_OP, False, [state()]),
    "optimizer": (PolicyAction.OPTIMIZER, False, [state()]),
    "pause": (PolicyAction.PAUSE, False, [state(seeds=(TRAINING,))]),
    "loss_spike_pauses_a_seed": (PolicyAction.NO_OP, False, [state(1.0), state(2.0, seeds=(TRAINING,))]),
    "conservative_without_command": (PolicyAction.NO_OP, True, [state()]),
    "conservative_turns_germinate_into_pause": (PolicyAction.GERMINATE, True, [state()]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decision_says_whether_the_controller_issued_a_command(case: str) -> None:
    action, conservative, states = CASES[case]
    ctl = controller(action, conservative=conservative)
    for packet in states:
        decision = ctl.evaluate(packet)
    read = decision_from_packet(decision.telemetry)
    assert read.command_issued == (decision.command is not None)
    assert read.action == action.name.lower()
    assert read.validation_loss == pytest.approx(states[-1].validation_loss)
    if case == "germinate_deferred_no_slot":
        assert read.reasons == ("germination_deferred: no free seed slot in the model",)
        assert "no free seed slot" in read.describe()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[OonaClient]:
    oona = OonaClient(redis_url, StreamConfig(instance="t-decisions", block_ms=200), KeyRing(SECRET))
    try:
        yield oona
    finally:
        await oona.aclose()


async def test_reader_takes_this_runs_decisions_from_both_telemetry_streams(client: OonaClient) -> None:
    seen: list[ControllerDecision] = []
    arrived = asyncio.Event()

    def on_decision(decision: ControllerDecision) -> None:
        seen.append(decision)
        if len(seen) == 2:
            arrived.set()

    reader = DecisionReader(client, RUN, on_decision)
    calm = controller(PolicyAction.NO_OP).evaluate(state(0.5)).telemetry
    alarmed = controller(PolicyAction.NO_OP, conservative=True).evaluate(state(0.25)).telemetry
    other_run = controller(PolicyAction.NO_OP).evaluate(state(0.75)).telemetry
    other_run.system_health.indicators["training_run_id"] = "someone-else"
    not_tamiyo = leyline_pb2.TelemetryPacket(source_subsystem="kasmina")
    not_tamiyo.system_health.indicators["training_run_id"] = RUN
    async with running(reader.run, "decisions"):
        for packet in (other_run, not_tamiyo, calm):
            assert await client.publish_telemetry(packet)
        # A warning makes the decision HIGH priority: it travels on the emergency stream.
        assert await client.publish_telemetry(alarmed, priority=_L.MESSAGE_PRIORITY_HIGH)
        await asyncio.wait_for(arrived.wait(), 30)
    assert sorted(d.validation_loss for d in seen) == [0.25, 0.5]
    assert reader.seen == 2


def tiny_trainer(client: OonaClient, services: list[object]) -> TolariaTrainer:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=16)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    add_seed_slots(model, {"0": 8})
    manager = KasminaSeedManager(keys=KeyRing(SECRET), training_run_id=RUN)
    manager.register_host_model(model)
    return TolariaTrainer(
        model,
        manager,
        loader,
        loader,
        client=client,
        training_run_id=RUN,
        # Far beyond the test's timeout: only the controller's decision can end the wait.
        config=TrainingConfig(max_epochs=2, command_wait_s=3600.0),
        loss=nn.MSELoss(),
        services=services,  # type: ignore[arg-type]
    )


async def test_a_decision_without_command_ends_the_epochs_wait(redis_url: str, client: OonaClient) -> None:
    tamiyo_client = OonaClient(redis_url, StreamConfig(instance="t-tamiyo", block_ms=200), KeyRing(SECRET))
    service = TamiyoService(tamiyo_client, controller(PolicyAction.NO_OP))
    trainer: TolariaTrainer | None = None

    def on_decision(decision: ControllerDecision) -> None:
        assert trainer is not None
        trainer.notify_decision(decision)

    trainer = tiny_trainer(client, [DecisionReader(client, RUN, on_decision)])
    try:
        async with running(service.run, "tamiyo"):
            results = await trainer.run()
    finally:
        await tamiyo_client.aclose()
    assert [r.epoch for r in results] == [1, 2]
    for result in results:
        assert result.decision is not None
        assert result.decision.action == "no_op"
        assert not result.decision.command_issued
        assert result.decision.validation_loss == pytest.approx(result.validation_loss, rel=1e-6)
        assert result.commands == []
