"""Tolaria over real Redis and real torch: honest validation, commands between epochs, checkpoints."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from _stream_support import read_stream
from torch import nn

from esper.karn import KarnCatalog
from esper.kasmina import KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing, sign_command
from esper.tezzeret.kernels import build_kernel
from esper.tolaria import (
    DataSplits,
    EpochResult,
    TolariaTrainer,
    TrainingConfig,
    build_host_model,
    list_checkpoints,
    load_checkpoint,
    load_digits_splits,
    packet_priority,
)

_L = leyline_pb2
SECRET = b"tolaria-test-secret-0123456789abcdef"
RUN = "run-tolaria"
HIDDEN = 16


class TezzeretRuntime:
    """An in-process blueprint runtime building Tezzeret's real kernels."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.catalog = KarnCatalog()
        self.calls: list[str] = []

    def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
        self.calls.append(blueprint_id)
        return build_kernel(blueprint_id, self.catalog.default_parameters(blueprint_id), self.dim), 0.5


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing(SECRET)


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return load_digits_splits(limit=600, seed=0, batch_size=64)


@pytest.fixture
async def client(redis_url: str, keys: KeyRing) -> AsyncIterator[OonaClient]:
    oona = OonaClient(redis_url, StreamConfig(instance="t1", block_ms=200), keys)
    try:
        yield oona
    finally:
        await oona.aclose()


def make_manager(keys: KeyRing, model: nn.Module) -> KasminaSeedManager:
    manager = KasminaSeedManager(
        runtime=TezzeretRuntime(HIDDEN),
        keys=keys,
        training_run_id=RUN,
        training_steps=2,
        shadowing_steps=2,
    )
    manager.register_host_model(model)
    return manager


def germinate(
    keys: KeyRing, seed_id: str = "hidden1", blueprint_id: str = "BP002"
) -> leyline_pb2.AdaptationCommand:
    command = leyline_pb2.AdaptationCommand(
        version=1,
        command_id=f"cmd-{time.time_ns()}",
        command_type=_L.COMMAND_SEED,
        target_seed_id=seed_id,
        issued_by="tamiyo",
    )
    command.seed_operation.operation = _L.SEED_OP_GERMINATE
    command.seed_operation.blueprint_id = blueprint_id
    command.issued_at.FromNanoseconds(time.time_ns())
    command.annotations["training_run_id"] = RUN
    sign_command(command, keys)
    return command


def optimizer_hint(keys: KeyRing) -> leyline_pb2.AdaptationCommand:
    command = leyline_pb2.AdaptationCommand(
        version=1, command_id=f"cmd-{time.time_ns()}", command_type=_L.COMMAND_OPTIMIZER, issued_by="tamiyo"
    )
    command.optimizer_adjustment.optimizer_id = "host"
    command.issued_at.FromNanoseconds(time.time_ns())
    command.annotations["training_run_id"] = RUN
    sign_command(command, keys)
    return command


def independent_eval(model: nn.Module, data: DataSplits) -> tuple[float, float]:
    """Loss and accuracy recomputed from scratch on the whole held-out split."""
    xs = torch.cat([x for x, _ in data.validation])
    ys = torch.cat([y for _, y in data.validation])
    model.eval()
    with torch.no_grad():
        logits = model(xs)
    model.train()
    loss = float(nn.functional.cross_entropy(logits, ys))
    return loss, int((logits.argmax(dim=1) == ys).sum()) / len(ys)


async def test_two_epochs_publish_honest_validation_and_telemetry(
    redis_url: str, keys: KeyRing, client: OonaClient, data: DataSplits
) -> None:
    model = build_host_model(data.features, data.classes, hidden=HIDDEN, add_slots=add_seed_slots)
    manager = make_manager(keys, model)
    # A forged command is rejected: Kasmina's packet for it carries an ERROR event (HIGH priority).
    forged = germinate(KeyRing(b"some-other-secret-0123456789abcdef"))
    assert (await manager.handle_command(forged)).status == "rejected"
    trainer = TolariaTrainer(
        model,
        manager,
        data.train,
        data.validation,
        client=client,
        training_run_id=RUN,
        config=TrainingConfig(max_epochs=2),
    )
    independent: list[tuple[float, float]] = []

    def check(result: EpochResult) -> None:
        independent.append(independent_eval(model, data))

    results = await trainer.run(on_epoch=check)

    assert [r.epoch for r in results] == [1, 2]
    for result, (loss, accuracy) in zip(results, independent, strict=True):
        assert result.validation_accuracy == pytest.approx(accuracy, abs=1e-9)
        assert result.validation_loss == pytest.approx(loss, rel=1e-5)
        assert (
            result.validation_accuracy != result.train_accuracy or result.validation_loss != result.train_loss
        )
        assert result.published
        assert result.gradient_norm > 0
    assert results[1].validation_loss < results[0].validation_loss
    assert results[1].train_loss < results[0].train_loss

    states = [
        _L.SystemStatePacket.FromString(payload)
        for kind, payload in await read_stream(redis_url, "oona.normal")
        if kind == _L.BUS_MESSAGE_TYPE_SYSTEM_STATE
    ]
    assert [s.packet_id for s in states] == [f"{RUN}-epoch-1", f"{RUN}-epoch-2"]
    for state, (loss, accuracy) in zip(states, independent, strict=True):
        assert state.version == 1
        assert state.source_subsystem == "tolaria"
        assert state.training_run_id == RUN
        assert state.validation_accuracy == pytest.approx(accuracy, rel=1e-6)
        assert state.validation_loss == pytest.approx(loss, rel=1e-5)
        assert set(state.training_metrics) >= {
            "train_loss",
            "train_accuracy",
            "gradient_norm",
            "epoch_latency_ms",
            "samples_per_s",
        }
        assert state.hardware_context.device_type == "cpu"
        assert state.timestamp_ns > 0
    assert states[1].global_step == 2 * states[0].global_step

    telemetry = [
        _L.TelemetryPacket.FromString(payload)
        for _kind, payload in await read_stream(redis_url, "oona.telemetry")
    ]
    tolaria = [p for p in telemetry if p.source_subsystem == "tolaria"]
    assert len(tolaria) == 2
    names = {m.name for m in tolaria[0].metrics}
    assert names >= {
        "tolaria.training.loss",
        "tolaria.training.accuracy",
        "tolaria.validation.loss",
        "tolaria.validation.accuracy",
        "tolaria.training.latency_ms",
        "tolaria.seeds.active",
    }
    value = {m.name: m.value for m in tolaria[1].metrics}
    assert value["tolaria.validation.accuracy"] == pytest.approx(independent[1][1], rel=1e-6)
    assert any(p.source_subsystem == "kasmina" for p in telemetry)
    urgent = [
        _L.TelemetryPacket.FromString(payload)
        for _kind, payload in await read_stream(redis_url, "oona.emergency")
    ]
    assert [p.source_subsystem for p in urgent] == ["kasmina"]
    assert packet_priority(urgent[0]) == _L.MESSAGE_PRIORITY_HIGH
    assert any(e.description == "command_rejected" for e in urgent[0].events)


async def test_command_between_epochs_grafts_a_seed(
    redis_url: str, keys: KeyRing, client: OonaClient, data: DataSplits
) -> None:
    model = build_host_model(data.features, data.classes, hidden=HIDDEN, add_slots=add_seed_slots)
    manager = make_manager(keys, model)
    config = TrainingConfig(max_epochs=2, command_wait_s=10.0)
    answered: list[int] = []

    async def tamiyo(message: OonaMessage) -> None:
        """Stand-in controller: GERMINATE after epoch 1, an optimizer hint after epoch 2."""
        state = message.decode(_L.SystemStatePacket)
        answered.append(state.current_epoch)
        if state.current_epoch == 1:
            assert await client.publish_command(germinate(keys))
        else:
            assert await client.publish_command(optimizer_hint(keys))

    trainer: TolariaTrainer

    async def intake(message: OonaMessage) -> None:
        """Stand-in command intake: verified bus command -> manager, through the trainer."""
        await trainer.apply_command(message.decode(_L.AdaptationCommand))

    others = {_L.BUS_MESSAGE_TYPE_FIELD_REPORT}
    tamiyo_consumer = client.subscribe(
        "oona.normal",
        "tamiyo",
        tamiyo,
        types={_L.BUS_MESSAGE_TYPE_SYSTEM_STATE},
        ignore_types=others | {_L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND},
    )
    intake_client = OonaClient(redis_url, StreamConfig(instance="k1", block_ms=200), keys)
    intake_consumer = intake_client.subscribe(
        "oona.normal",
        "kasmina",
        intake,
        types={_L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND},
        ignore_types=others | {_L.BUS_MESSAGE_TYPE_SYSTEM_STATE},
    )
    trainer = TolariaTrainer(
        model,
        manager,
        data.train,
        data.validation,
        client=client,
        training_run_id=RUN,
        config=config,
        services=[tamiyo_consumer, intake_consumer],
    )
    try:
        first, second = await trainer.run()
    finally:
        await intake_client.aclose()

    assert answered == [1, 2]
    assert [(c.command_type, c.status) for c in second.commands] == [("COMMAND_OPTIMIZER", "applied")]
    assert first.seeds == []
    assert [(c.operation, c.target_seed_id, c.status) for c in first.commands] == [
        ("SEED_OP_GERMINATE", "hidden1", "applied")
    ]
    assert second.grafted == ["hidden1:BP002"]
    assert [s.seed_id for s in second.seeds] == ["hidden1"]
    assert second.seeds[0].blueprint_id == "BP002"
    assert second.seeds_active == 1
    seed_states = list(second.state.seed_states)
    assert [s.seed_id for s in seed_states] == ["hidden1"]
    assert seed_states[0].stage not in (
        _L.SEED_STAGE_UNKNOWN,
        _L.SEED_STAGE_DORMANT,
        _L.SEED_STAGE_GERMINATED,
    )
    # The grafted kernel trained under the seed optimizer during epoch 2.
    assert trainer.seed_optimizer is not None
    assert len(manager.seed_parameters()) > 0
    states = [
        _L.SystemStatePacket.FromString(payload)
        for kind, payload in await read_stream(redis_url, "oona.normal")
        if kind == _L.BUS_MESSAGE_TYPE_SYSTEM_STATE
    ]
    assert [len(s.seed_states) for s in states] == [0, 1]
    assert states[1].seed_states[0].seed_id == "hidden1"


async def test_wait_for_commands_times_out_without_answer(keys: KeyRing, data: DataSplits) -> None:
    model = build_host_model(data.features, data.classes, hidden=HIDDEN, add_slots=add_seed_slots)
    trainer = TolariaTrainer(
        model,
        make_manager(keys, model),
        data.train,
        data.validation,
        client=None,
        training_run_id=RUN,
        config=TrainingConfig(0),
    )
    assert await trainer.wait_for_commands(0.05) == []
    result = await trainer.apply_command(germinate(keys))
    assert result.applied
    assert [c.status for c in await trainer.wait_for_commands(0.0)] == ["applied"]


async def test_checkpoint_and_resume_restore_identical_weights(
    tmp_path: Path, keys: KeyRing, data: DataSplits
) -> None:
    directory = tmp_path / "ckpt"
    model = build_host_model(data.features, data.classes, hidden=HIDDEN, add_slots=add_seed_slots)
    manager = make_manager(keys, model)
    assert (await manager.handle_command(germinate(keys))).applied
    config = TrainingConfig(max_epochs=2, checkpoint_dir=directory)
    trainer = TolariaTrainer(
        model, manager, data.train, data.validation, client=None, training_run_id=RUN, config=config
    )
    results = await trainer.run()
    assert [epoch for epoch, _ in list_checkpoints(directory)] == [1, 2]
    assert results[1].checkpoint == directory / "ckpt-epoch-2.pt"
    assert sorted(p.name for p in directory.iterdir()) == ["ckpt-epoch-1.pt", "ckpt-epoch-2.pt"]
    saved = load_checkpoint(directory / "ckpt-epoch-2.pt")
    assert saved["epoch"] == 2
    assert set(saved["seeds"]) == {"hidden1"}

    fresh_model = build_host_model(
        data.features, data.classes, hidden=HIDDEN, add_slots=add_seed_slots, seed=99
    )
    fresh_manager = make_manager(keys, fresh_model)
    assert (await fresh_manager.handle_command(germinate(keys))).applied
    resumed = TolariaTrainer(
        fresh_model,
        fresh_manager,
        data.train,
        data.validation,
        client=None,
        training_run_id=RUN,
        config=config,
    )
    assert not torch.equal(fresh_model.state_dict()["head.weight"], model.state_dict()["head.weight"])
    assert await resumed.resume() == 2
    assert resumed.epoch == 2
    assert resumed.global_step == trainer.global_step
    original, restored = model.state_dict(), fresh_model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    host_state = trainer.host_optimizer.state_dict()["state"]
    resumed_state = resumed.host_optimizer.state_dict()["state"]
    for index, slots in host_state.items():
        assert torch.equal(slots["exp_avg"], resumed_state[index]["exp_avg"])
    kernel_a = manager.seeds["hidden1"].kernel
    kernel_b = fresh_manager.seeds["hidden1"].kernel
    assert kernel_a is not None
    assert kernel_b is not None
    for (name, a), b in zip(kernel_a.state_dict().items(), kernel_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # Seed lifecycle (stage, alpha) is Kasmina's state and is not in Tolaria's checkpoint:
    # with the seeds paused, the restored network computes exactly what the original did.
    for slot_owner in (manager, fresh_manager):
        slot_owner.pause("hidden1")
    assert independent_eval(model, data) == independent_eval(fresh_model, data)
    for slot_owner in (manager, fresh_manager):
        slot_owner.resume("hidden1")

    # Resuming at max_epochs trains nothing more; a longer config continues at epoch 3.
    assert await resumed.run() == []
    longer = TolariaTrainer(
        fresh_model,
        fresh_manager,
        data.train,
        data.validation,
        client=None,
        training_run_id=RUN,
        config=TrainingConfig(max_epochs=3, checkpoint_dir=directory),
    )
    assert await longer.resume() == 2
    assert [r.epoch for r in await longer.run()] == [3]


def test_build_host_model_has_named_slots() -> None:
    plain = build_host_model(64, 10, hidden=8)
    assert [name for name, _ in plain.named_children()] == ["hidden1", "act1", "hidden2", "act2", "head"]
    slotted = build_host_model(64, 10, hidden=8, add_slots=add_seed_slots, slots=("hidden1", "hidden2"))
    manager = KasminaSeedManager(keys=KeyRing(SECRET))
    assert set(manager.register_host_model(slotted)) == {"hidden1", "hidden2"}
    assert slotted(torch.zeros(3, 64)).shape == (3, 10)
    with pytest.raises(ValueError, match="unknown slot"):
        build_host_model(64, 10, slots=("nope",))
