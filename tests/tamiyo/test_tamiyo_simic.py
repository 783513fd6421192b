from __future__ import annotations

from pathlib import Path

import numpy as np
from _tamiyo_support import keyring, make_state, safe_catalog, weight_bytes

from esper.leyline import leyline_pb2
from esper.tamiyo import (
    FEATURE_NAMES,
    FieldReportStore,
    PolicyAction,
    TamiyoController,
    TamiyoPolicy,
    TamiyoPolicyRegistry,
    extract_features,
    generate_field_report,
)
from esper.tamiyo.decision import FEATURE_METRIC_PREFIX
from esper.tamiyo.payload import decode_payload, encode_tensors
from esper.tamiyo.simic import OUTCOME_REWARD, build_training_set, report_reward, train_policy_update

S = leyline_pb2


def _report(
    state: S.SystemStatePacket,
    action: PolicyAction,
    outcome: S.FieldReportOutcome.ValueType,
    blueprint: str = "",
    loss_delta: float | None = None,
) -> S.FieldReport:
    command = S.AdaptationCommand(command_id=f"cmd-{action.name}-{blueprint}", target_seed_id="seed-1")
    command.annotations["training_run_id"] = state.training_run_id
    metrics = {"action": float(action)}
    if loss_delta is not None:
        metrics["loss_delta"] = loss_delta
    features = extract_features(state, None).tolist()
    metrics.update({FEATURE_METRIC_PREFIX + n: v for n, v in zip(FEATURE_NAMES, features, strict=True)})
    return generate_field_report(command, outcome, metrics, blueprint_id=blueprint)


def test_rewards_use_only_real_outcomes() -> None:
    assert set(OUTCOME_REWARD) == {
        S.FIELD_REPORT_OUTCOME_SUCCESS,
        S.FIELD_REPORT_OUTCOME_NEUTRAL,
        S.FIELD_REPORT_OUTCOME_REGRESSION,
        S.FIELD_REPORT_OUTCOME_ABORTED,
    }
    state = make_state()
    ok = _report(state, PolicyAction.GERMINATE, S.FIELD_REPORT_OUTCOME_SUCCESS, "BP003", loss_delta=-0.2)
    reward = report_reward(ok)
    assert reward is not None
    assert abs(reward - 1.2) < 1e-6
    aborted = _report(state, PolicyAction.GERMINATE, S.FIELD_REPORT_OUTCOME_ABORTED, "BP003")
    assert report_reward(aborted) == -1.0
    unspecified = _report(state, PolicyAction.NO_OP, S.FIELD_REPORT_OUTCOME_SUCCESS)
    unspecified.outcome = S.FIELD_REPORT_OUTCOME_UNSPECIFIED
    assert report_reward(unspecified) is None
    data = build_training_set([ok, aborted, unspecified], ("BP002", "BP003"))
    assert len(data) == 2
    assert data.skipped == 1
    assert data.blueprints.tolist() == [1, 1]


def test_states_fill_in_missing_features() -> None:
    state = make_state()
    report = generate_field_report(
        S.AdaptationCommand(command_id="cmd-x"), S.FIELD_REPORT_OUTCOME_SUCCESS, {}, blueprint_id="BP003"
    )
    assert len(build_training_set([report], ("BP003",))) == 0
    data = build_training_set([report], ("BP003",), states={"cmd-x": state})
    assert len(data) == 1
    assert data.actions.tolist() == [int(PolicyAction.GERMINATE)]


def test_simic_fits_stored_reports_into_an_accepted_update_that_changes_decisions(tmp_path: Path) -> None:
    registry = TamiyoPolicyRegistry(TamiyoPolicy(), policy_dir=tmp_path / "policies")
    ctl = TamiyoController(keyring(), safe_catalog(), registry=registry)
    state = make_state()
    before = ctl.evaluate(state)
    # reward a germination the untrained policy does not choose on this state
    target = "BP021" if before.policy_output.blueprint_id != "BP021" else "BP002"

    store = FieldReportStore(tmp_path / "field_reports.log")
    for _ in range(3):
        store.append(_report(state, PolicyAction.GERMINATE, S.FIELD_REPORT_OUTCOME_SUCCESS, target, -0.3))
        if before.action is not PolicyAction.GERMINATE:
            store.append(_report(state, before.action, S.FIELD_REPORT_OUTCOME_REGRESSION, loss_delta=0.2))
    store.close()
    reloaded = FieldReportStore(tmp_path / "field_reports.log")

    weights_before = weight_bytes(registry.policy)
    run = train_policy_update(reloaded, registry, policy_id="simic-test", training_run_id="offline-1")
    assert run.result.passed
    assert run.result.final_loss < run.result.initial_loss
    assert weight_bytes(registry.policy) == weights_before  # training works on a copy
    update = run.update
    assert update is not None
    assert update.version == 1
    assert update.tamiyo_policy_version == "1"
    assert update.policy_id == "simic-test"
    assert update.training_run_id == "offline-1"
    assert update.issued_at.seconds > 0
    decode_payload(update.payload)  # safetensors, not pickle

    result = ctl.apply_policy_update(update, max_age_s=60)
    assert result.accepted, result
    after = ctl.evaluate(make_state(run_id="run-2"))
    assert after.action is PolicyAction.GERMINATE
    assert after.command is not None
    assert after.command.seed_operation.blueprint_id == target
    assert (after.action, after.policy_output.blueprint_id) != (
        before.action,
        before.policy_output.blueprint_id,
    )
    assert after.command.annotations["policy_version"] == "1"

    # the same round again proposes version 2
    assert train_policy_update(reloaded, registry).update.version == 2  # type: ignore[union-attr]


def test_forged_update_with_changed_shapes_is_rejected(tmp_path: Path) -> None:
    registry = TamiyoPolicyRegistry(TamiyoPolicy())
    state = make_state()
    reports = [_report(state, PolicyAction.GERMINATE, S.FIELD_REPORT_OUTCOME_SUCCESS, "BP009", -0.1)]
    run = train_policy_update(reports, registry)
    assert run.update is not None
    tensors, meta = decode_payload(run.update.payload)
    tensors["encoder.2.weight"] = np.zeros((64, 65), dtype=np.float32)
    forged = leyline_pb2.PolicyUpdate()
    forged.CopyFrom(run.update)
    forged.payload = encode_tensors(tensors, meta)
    before = weight_bytes(registry.policy)
    result = registry.apply(forged)
    assert not result.accepted
    assert result.reason == "shape_mismatch"
    assert weight_bytes(registry.policy) == before
    assert registry.version == 0


def test_no_signal_gives_no_update() -> None:
    registry = TamiyoPolicyRegistry(TamiyoPolicy())
    neutral = _report(make_state(), PolicyAction.NO_OP, S.FIELD_REPORT_OUTCOME_NEUTRAL)
    run = train_policy_update([neutral], registry)
    assert run.update is None
    assert run.result.reason == "no_training_signal"
