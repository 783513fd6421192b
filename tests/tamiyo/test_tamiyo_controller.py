from __future__ import annotations

import time
from pathlib import Path

import pytest
from _tamiyo_support import biased_policy, descriptor, keyring, make_state, safe_catalog

from esper.core import EsperSettings
from esper.leyline import leyline_pb2
from esper.security import KeyRing, verify_command
from esper.tamiyo import (
    CachedBlueprintMetadata,
    ControllerConfig,
    FieldReportStore,
    PolicyAction,
    StaticBlueprintMetadata,
    TamiyoController,
    TamiyoPolicyRegistry,
)

S = leyline_pb2


def controller(
    action: PolicyAction = PolicyAction.GERMINATE,
    blueprint: str = "BP003",
    *,
    catalog: StaticBlueprintMetadata | None = None,
    config: ControllerConfig | None = None,
    settings: EsperSettings | None = None,
    store: FieldReportStore | None = None,
) -> TamiyoController:
    return TamiyoController(
        keyring(),
        catalog or safe_catalog(),
        registry=TamiyoPolicyRegistry(biased_policy(action, blueprint)),
        config=config,
        settings=settings,
        store=store,
    )


def test_germinate_command_is_signed_addressed_and_stamped_now() -> None:
    decision = controller().evaluate(make_state(timestamp_ns=0))
    command = decision.command
    assert command is not None
    assert command.command_type == S.COMMAND_SEED
    assert command.seed_operation.operation == S.SEED_OP_GERMINATE
    assert command.seed_operation.blueprint_id == "BP003"
    assert 0.0 <= command.seed_operation.parameters["alpha"] <= 1.0
    assert command.target_seed_id == "seed-1"
    assert command.version == 1
    assert command.issued_by == "tamiyo"
    assert len(command.command_id) == 32
    assert abs(command.issued_at.ToNanoseconds() / 1e9 - time.time()) < 5  # not 1970
    ann = command.annotations
    assert ann["training_run_id"] == "run-1"
    assert ann["policy_action"] == "germinate"
    assert ann["policy_version"] == "0"
    assert ann["blueprint_tier"] == "BLUEPRINT_TIER_SAFE"
    assert ann["blueprint_risk"] == "0.10"
    assert verify_command(command, keyring())
    assert not verify_command(command, KeyRing(b"another-secret-entirely-0123456789"))
    tampered = S.AdaptationCommand()
    tampered.CopyFrom(command)
    tampered.target_seed_id = "seed-9"
    assert not verify_command(tampered, keyring())


def _comparable(command: S.AdaptationCommand) -> S.AdaptationCommand:
    copy = S.AdaptationCommand()
    copy.CopyFrom(command)
    copy.command_id = ""
    copy.ClearField("issued_at")
    copy.annotations.pop("signature")
    return copy


def test_same_state_gives_same_command_fields() -> None:
    state = make_state()
    a = controller().evaluate(state).command
    b = controller().evaluate(state).command
    assert a is not None
    assert b is not None
    assert a.command_id != b.command_id
    assert _comparable(a) == _comparable(b)


def test_next_seed_slot_comes_from_seed_states() -> None:
    state = make_state(seeds=(("seed-1", S.SEED_STAGE_FOSSILIZED), ("seed-3", S.SEED_STAGE_CULLED)))
    command = controller().evaluate(state).command
    assert command is not None
    assert command.target_seed_id == "seed-4"


@pytest.mark.parametrize("stage", [S.SEED_STAGE_GERMINATED, S.SEED_STAGE_TRAINING, S.SEED_STAGE_BLENDING])
def test_no_germination_while_a_graft_is_in_flight(stage: S.SeedLifecycleStage.ValueType) -> None:
    decision = controller().evaluate(make_state(seeds=(("seed-1", stage),)))
    assert decision.command is None
    assert "germination_deferred" in decision.events


def test_max_seeds_limits_growth() -> None:
    seeds = tuple((f"seed-{i}", S.SEED_STAGE_FOSSILIZED) for i in range(1, 3))
    decision = controller(config=ControllerConfig(max_seeds=2)).evaluate(make_state(seeds=seeds))
    assert decision.command is None
    assert "germination_deferred" in decision.events


@pytest.mark.parametrize(
    "bad",
    [
        descriptor("BP003", quarantine_only=True),
        descriptor("BP003", risk=0.8),
        descriptor("BP003", risk=0.95),
    ],
)
def test_quarantine_or_high_risk_blueprint_pauses_without_payload(bad: S.BlueprintDescriptor) -> None:
    decision = controller(catalog=safe_catalog(bad)).evaluate(make_state())
    command = decision.command
    assert command is not None
    assert command.command_type == S.COMMAND_PAUSE
    assert command.WhichOneof("payload") is None
    assert not command.HasField("seed_operation")
    assert command.annotations["risk_reason"] == "blueprint_high_risk"
    assert "bp_quarantine" in decision.events
    assert verify_command(command, keyring())
    assert decision.telemetry.system_health.status == S.HEALTH_STATUS_DEGRADED


def test_loss_spike_for_the_same_run_pauses() -> None:
    ctl = controller(PolicyAction.OPTIMIZER)
    assert ctl.evaluate(make_state(validation_loss=1.0)).command.command_type == S.COMMAND_OPTIMIZER  # type: ignore[union-attr]
    # another run's loss does not count as a spike for run-1
    other = ctl.evaluate(make_state(run_id="run-2", validation_loss=5.0))
    assert other.command is not None
    assert other.command.command_type == S.COMMAND_OPTIMIZER
    spiked = ctl.evaluate(make_state(validation_loss=1.2))
    assert spiked.command is not None
    assert spiked.command.command_type == S.COMMAND_PAUSE
    assert spiked.command.WhichOneof("payload") is None
    assert spiked.command.annotations["risk_reason"] == "loss_spike"
    assert "pause_triggered" in spiked.events


def test_loss_spike_pauses_the_seed_being_grafted() -> None:
    ctl = controller(PolicyAction.NO_OP)
    assert ctl.evaluate(make_state(validation_loss=1.0)).command is None
    state = make_state(validation_loss=1.5, seeds=(("seed-1", S.SEED_STAGE_TRAINING),))
    command = ctl.evaluate(state).command
    assert command is not None
    assert command.command_type == S.COMMAND_PAUSE
    assert command.target_seed_id == "seed-1"


def test_conservative_mode_from_settings_pauses(tmp_path: Path) -> None:
    settings = EsperSettings(tamiyo_conservative_mode=True, var_dir=tmp_path)
    ctl = controller(settings=settings)
    assert ctl.conservative_mode
    decision = ctl.evaluate(make_state())
    assert decision.command is not None
    assert decision.command.command_type == S.COMMAND_PAUSE
    assert decision.command.WhichOneof("payload") is None
    assert decision.command.annotations["risk_reason"] == "conservative_mode"
    ctl.set_conservative_mode(False)
    assert ctl.evaluate(make_state(run_id="run-2")).command.command_type == S.COMMAND_SEED  # type: ignore[union-attr]


def test_unknown_blueprint_gives_no_command() -> None:
    catalog = StaticBlueprintMetadata([descriptor("BP002")])
    decision = controller(blueprint="BP009", catalog=catalog).evaluate(make_state())
    assert decision.command is None
    assert "bp_unknown" in decision.events
    assert decision.action is PolicyAction.GERMINATE


class _CountingSource:
    def __init__(self) -> None:
        self.calls = 0
        self.inner = safe_catalog()

    def get(self, blueprint_id: str) -> S.BlueprintDescriptor:
        self.calls += 1
        return self.inner.get(blueprint_id)


def test_blueprint_metadata_is_cached_with_ttl() -> None:
    now = [0.0]
    source = _CountingSource()
    cache = CachedBlueprintMetadata(source, ttl_s=10.0, clock=lambda: now[0])
    for _ in range(3):
        cache.get("BP003")
    assert source.calls == 1
    now[0] = 11.0
    cache.get("BP003")
    assert source.calls == 2
    with pytest.raises(KeyError):
        cache.get("BP999")
    assert source.calls == 3  # unknown ids are not cached
    ctl = TamiyoController(
        keyring(), cache, registry=TamiyoPolicyRegistry(biased_policy(PolicyAction.GERMINATE))
    )
    ctl.evaluate(make_state())
    assert source.calls == 3  # BP003 served from the cache


def test_telemetry_is_bounded_and_drained_once() -> None:
    ctl = controller(PolicyAction.NO_OP, config=ControllerConfig(telemetry_capacity=3))
    decisions = [ctl.evaluate(make_state(epoch=i)) for i in range(5)]
    assert ctl.telemetry_dropped == 2
    drained = ctl.drain_telemetry()
    assert [p.packet_id for p in drained] == [d.telemetry.packet_id for d in decisions[2:]]
    assert ctl.drain_telemetry() == []
    names = {m.name for m in drained[0].metrics}
    assert {"tamiyo.validation_loss", "tamiyo.loss_delta", "tamiyo.inference.latency_ms"} <= names


def test_run_state_is_bounded() -> None:
    ctl = controller(PolicyAction.NO_OP, config=ControllerConfig(max_runs=2))
    for run in ("a", "b", "c"):
        ctl.evaluate(make_state(run_id=run))
    # run "a" was evicted: a huge loss is its "first" packet again, so no spike
    assert "pause_triggered" not in ctl.evaluate(make_state(run_id="a", validation_loss=9.0)).events


def test_previous_command_is_closed_by_a_stored_field_report(tmp_path: Path) -> None:
    store = FieldReportStore(tmp_path / "reports.log")
    ctl = controller(PolicyAction.OPTIMIZER, store=store)
    first = ctl.evaluate(make_state(validation_loss=1.0))
    assert first.field_report is None
    second = ctl.evaluate(make_state(validation_loss=0.9, epoch=4))
    report = second.field_report
    assert report is not None
    assert first.command is not None
    assert report.command_id == first.command.command_id
    assert report.outcome == S.FIELD_REPORT_OUTCOME_SUCCESS
    assert report.training_run_id == "run-1"
    assert abs(report.metrics["loss_delta"] + 0.1) < 1e-5
    assert report.metrics["action"] == float(PolicyAction.OPTIMIZER)
    assert "feature.validation_loss" in report.metrics
    assert [r.report_id for r in FieldReportStore(tmp_path / "reports.log").reports()] == [report.report_id]
