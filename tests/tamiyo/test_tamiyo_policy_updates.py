from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _tamiyo_support import biased_policy, keyring, make_state, safe_catalog, weight_bytes

from esper.core import EsperSettings
from esper.leyline import leyline_pb2
from esper.tamiyo import (
    PolicyAction,
    TamiyoController,
    TamiyoPolicy,
    TamiyoPolicyRegistry,
    decode_payload,
    encode_policy,
    policy_version_of,
)
from esper.tamiyo.payload import encode_tensors
from esper.tamiyo.registry import policy_metadata

S = leyline_pb2


def _update(payload: bytes, version: int = 1, *, issued_at: float | None = None) -> S.PolicyUpdate:
    update = S.PolicyUpdate(
        version=version,
        policy_id="tamiyo-test",
        training_run_id="simic-run",
        tamiyo_policy_version=str(version),
        payload=payload,
    )
    update.issued_at.FromNanoseconds(int((time.time() if issued_at is None else issued_at) * 1e9))
    return update


def _controller(tmp_path: Path, action: PolicyAction = PolicyAction.NO_OP) -> TamiyoController:
    registry = TamiyoPolicyRegistry(biased_policy(action), policy_dir=tmp_path / "policies")
    return TamiyoController(keyring(), safe_catalog(), registry=registry)


def _tensors(policy: TamiyoPolicy) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in policy.weights.items()}


class _Trap:
    """Unpickling this creates ``marker``: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_valid_newer_update_changes_decisions(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, PolicyAction.NO_OP)
    state = make_state()
    assert ctl.evaluate(state).command is None
    germinating = biased_policy(PolicyAction.GERMINATE, "BP014")
    result = ctl.apply_policy_update(_update(encode_policy(germinating, 1, "tamiyo-test"), 1))
    assert result.accepted
    assert result.reason == "accepted"
    assert result.current_version == 1
    decision = ctl.evaluate(make_state(run_id="run-2"))
    assert decision.command is not None
    assert decision.command.seed_operation.blueprint_id == "BP014"
    assert decision.command.annotations["policy_version"] == "1"
    assert ctl.policy_version == 1
    assert ctl.registry.policy_id == "tamiyo-test"
    events = [e.description for p in ctl.drain_telemetry() for e in p.events]
    assert "policy_update_accepted" in events


def _assert_rejected(ctl: TamiyoController, update: S.PolicyUpdate, reason: str) -> None:
    before_weights = weight_bytes(ctl.policy)
    before_version = ctl.policy_version
    before_decision = ctl.evaluate(make_state(run_id="probe-before")).action
    result = ctl.apply_policy_update(update)
    assert not result.accepted
    assert result.reason == reason, result
    assert weight_bytes(ctl.policy) == before_weights
    assert ctl.policy_version == before_version
    assert ctl.evaluate(make_state(run_id="probe-after")).action == before_decision


def test_older_or_equal_versions_are_rejected(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    good = encode_policy(biased_policy(PolicyAction.PAUSE), 5, "p")
    assert ctl.apply_policy_update(_update(good, 5)).accepted
    other = encode_policy(biased_policy(PolicyAction.GERMINATE), 5, "p")
    _assert_rejected(ctl, _update(other, 5), "stale_version")
    _assert_rejected(ctl, _update(other, 4), "stale_version")


def test_version_rules() -> None:
    assert policy_version_of(S.PolicyUpdate(version=1, tamiyo_policy_version="12")) == 12
    assert policy_version_of(S.PolicyUpdate(version=3)) == 3
    for bad in (S.PolicyUpdate(), S.PolicyUpdate(version=2, tamiyo_policy_version="v2")):
        with pytest.raises(Exception, match="malformed_version"):
            policy_version_of(bad)


def test_wrong_keys_are_rejected(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    tensors = _tensors(biased_policy(PolicyAction.GERMINATE))
    tensors["extra.weight"] = np.zeros(2, dtype=np.float32)
    _assert_rejected(ctl, _update(encode_tensors(tensors)), "key_mismatch")
    tensors = _tensors(biased_policy(PolicyAction.GERMINATE))
    del tensors["param_head.bias"]
    _assert_rejected(ctl, _update(encode_tensors(tensors)), "key_mismatch")


def test_wrong_shapes_are_rejected(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    tensors = _tensors(biased_policy(PolicyAction.GERMINATE))
    tensors["blueprint_head.weight"] = np.zeros((8, 64), dtype=np.float32)
    _assert_rejected(ctl, _update(encode_tensors(tensors)), "shape_mismatch")


def test_wrong_dtype_is_rejected(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    tensors = _tensors(biased_policy(PolicyAction.GERMINATE))
    tensors["action_head.bias"] = tensors["action_head.bias"].astype(np.float64)
    _assert_rejected(ctl, _update(encode_tensors(tensors)), "dtype_mismatch")
    # bfloat16 has no numpy twin: it is refused from the header, before anything is decoded
    from safetensors.torch import save

    weights = {k: torch.from_numpy(v) for k, v in _tensors(biased_policy(PolicyAction.GERMINATE)).items()}
    weights["action_head.bias"] = weights["action_head.bias"].to(torch.bfloat16)
    _assert_rejected(ctl, _update(save(weights)), "dtype_mismatch")


def test_non_finite_tensors_are_rejected(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    for bad in (float("nan"), float("inf")):
        tensors = _tensors(biased_policy(PolicyAction.GERMINATE))
        tensors["encoder.0.weight"][3, 4] = bad
        _assert_rejected(ctl, _update(encode_tensors(tensors)), "non_finite")


def test_candidate_list_must_match(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    policy = biased_policy(PolicyAction.GERMINATE)
    meta = policy_metadata(policy, 1, "p")
    meta["blueprint_candidates"] = json.dumps(["BP099", *policy.blueprint_candidates[1:]])
    _assert_rejected(ctl, _update(encode_tensors(policy.weights, meta)), "candidate_mismatch")


def test_pickle_payloads_are_rejected_and_never_unpickled(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    # the trap is real: unpickling it does create a file
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Trap(proof)))
    assert proof.exists()

    marker = tmp_path / "pwned"
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        _assert_rejected(ctl, _update(pickle.dumps(_Trap(marker), protocol=protocol)), "unsafe_payload")
    buffer = io.BytesIO()
    torch.save({"trap": _Trap(marker)}, buffer)
    _assert_rejected(ctl, _update(buffer.getvalue()), "unsafe_payload")
    legacy = io.BytesIO()
    weights = {
        k: torch.from_numpy(v.copy()) for k, v in biased_policy(PolicyAction.GERMINATE).weights.items()
    }
    torch.save(weights, legacy, _use_new_zipfile_serialization=False)
    _assert_rejected(ctl, _update(legacy.getvalue()), "unsafe_payload")
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}!!!!!!!", b"\xff" * 64],
)
def test_garbage_payloads_are_malformed(tmp_path: Path, payload: bytes) -> None:
    _assert_rejected(_controller(tmp_path), _update(payload), "malformed_payload")


def test_truncated_safetensors_is_malformed(tmp_path: Path) -> None:
    blob = encode_policy(biased_policy(PolicyAction.GERMINATE), 1, "p")
    _assert_rejected(_controller(tmp_path), _update(blob[: len(blob) // 2]), "malformed_payload")


def test_optional_freshness_check(tmp_path: Path) -> None:
    ctl = _controller(tmp_path)
    blob = encode_policy(biased_policy(PolicyAction.GERMINATE), 1, "p")
    stale = ctl.apply_policy_update(_update(blob, issued_at=time.time() - 600), max_age_s=60)
    assert stale.reason == "stale_update"
    future = ctl.apply_policy_update(_update(blob, issued_at=time.time() + 600), max_age_s=60)
    assert future.reason == "issued_in_future"
    unstamped = _update(blob)
    unstamped.ClearField("issued_at")
    assert ctl.apply_policy_update(unstamped, max_age_s=60).reason == "missing_timestamp"
    assert ctl.apply_policy_update(_update(blob), max_age_s=60).accepted


def test_accepted_policy_is_persisted_and_resumed(tmp_path: Path) -> None:
    settings = EsperSettings(tamiyo_policy_dir=tmp_path / "policies", var_dir=tmp_path / "var")
    first = TamiyoController.from_settings(settings, keyring(), safe_catalog())
    assert first.policy_version == 0
    germinating = biased_policy(PolicyAction.GERMINATE, "BP021")
    assert first.apply_policy_update(_update(encode_policy(germinating, 3, "persisted"), 3)).accepted
    files = sorted(p.name for p in (tmp_path / "policies").iterdir())
    assert files == ["tamiyo-policy-v0000000003.safetensors"]
    _, meta = decode_payload((tmp_path / "policies" / files[0]).read_bytes())
    # the update's own policy_id wins over what the payload header claims
    assert meta["tamiyo_policy_version"] == "3"
    assert meta["policy_id"] == "tamiyo-test"

    restarted = TamiyoController.from_settings(settings, keyring(), safe_catalog())
    assert restarted.policy_version == 3
    assert restarted.registry.policy_id == "tamiyo-test"
    assert weight_bytes(restarted.policy) == weight_bytes(germinating)
    command = restarted.evaluate(make_state()).command
    assert command is not None
    assert command.seed_operation.blueprint_id == "BP021"
    assert (tmp_path / "var" / "tamiyo" / "field_reports.log").parent.is_dir()


def test_corrupt_persisted_file_is_skipped(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    registry = TamiyoPolicyRegistry(policy_dir=policy_dir)
    assert registry.apply(_update(encode_policy(biased_policy(PolicyAction.PAUSE), 1, "p"), 1)).accepted
    (policy_dir / "tamiyo-policy-v0000000002.safetensors").write_bytes(b"torn write")
    fresh = TamiyoPolicyRegistry(policy_dir=policy_dir)
    assert fresh.resume()
    assert fresh.version == 1
