"""Policy versions: bounded ASCII digits, bounded jumps, and every accepted version survives a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _tamiyo_support import biased_policy, weight_bytes

from esper.leyline import leyline_pb2
from esper.tamiyo import PolicyAction, TamiyoPolicyRegistry, encode_policy, policy_version_of
from esper.tamiyo.registry import MAX_VERSION_STEP, PolicyRejected

S = leyline_pb2
PAYLOAD = encode_policy(biased_policy(PolicyAction.GERMINATE, "BP014"), 1, "p")


def _update(label: str, version: int = 1) -> S.PolicyUpdate:
    update = S.PolicyUpdate(version=version, policy_id="p", tamiyo_policy_version=label, payload=PAYLOAD)
    update.issued_at.FromNanoseconds(time.time_ns())
    return update


@pytest.mark.parametrize(
    "label",
    ["²", "٣", "1²", "\uff11\uff12", "+5", "-1", "1_000", "0x10", "1.0", "9" * 19, "9" * 5000],
)
def test_only_bounded_ascii_decimal_versions_are_read(label: str) -> None:
    with pytest.raises(PolicyRejected) as info:
        policy_version_of(_update(label))
    assert info.value.reason == "malformed_version"
    assert len(str(info.value)) < 200  # a 5,000-digit label is described, not echoed


def test_valid_labels() -> None:
    assert policy_version_of(_update("7")) == 7
    assert policy_version_of(_update(" 12\n")) == 12
    assert policy_version_of(_update("9" * 18)) == 10**18 - 1
    assert policy_version_of(_update("", version=4)) == 4


@pytest.mark.parametrize("label", ["²", "٣", "9" * 5000])
def test_malformed_versions_are_rejected_with_a_reason_not_an_exception(label: str) -> None:
    registry = TamiyoPolicyRegistry()
    result = registry.apply(_update(label))
    assert not result.accepted
    assert result.reason == "malformed_version"
    assert result.update_version is None
    assert registry.version == 0


def test_a_far_future_version_does_not_block_later_updates_or_vanish(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    registry = TamiyoPolicyRegistry(policy_dir=policy_dir)
    before = weight_bytes(registry.policy)
    bogus = registry.apply(_update("99999999999"))
    assert (bogus.accepted, bogus.reason, bogus.update_version) == (False, "version_jump", 99999999999)
    assert weight_bytes(registry.policy) == before
    assert registry.apply(_update(str(MAX_VERSION_STEP + 1))).reason == "version_jump"

    # The next genuine update goes through, and so does a bounded jump from it.
    assert registry.apply(_update("1")).accepted
    assert registry.apply(_update(str(1 + MAX_VERSION_STEP))).accepted
    assert registry.version == 1 + MAX_VERSION_STEP

    restarted = TamiyoPolicyRegistry(policy_dir=policy_dir)
    assert restarted.resume()
    assert restarted.version == 1 + MAX_VERSION_STEP
    assert restarted.apply(_update("99999999999")).reason == "version_jump"
    assert restarted.apply(_update(str(2 + MAX_VERSION_STEP))).accepted


def test_versions_beyond_ten_digits_are_resumed_after_a_restart(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    registry = TamiyoPolicyRegistry(policy_dir=policy_dir, version=99_999_999_990, max_version_step=50)
    assert registry.apply(_update("99999999999")).accepted
    assert sorted(p.name for p in policy_dir.iterdir()) == ["tamiyo-policy-v99999999999.safetensors"]

    restarted = TamiyoPolicyRegistry(policy_dir=policy_dir)
    assert restarted.resume()
    assert restarted.version == 99_999_999_999
    assert weight_bytes(restarted.policy) == weight_bytes(registry.policy)
    assert restarted.apply(_update("100000000000")).accepted  # 12 digits, one step on
    again = TamiyoPolicyRegistry(policy_dir=policy_dir)
    assert again.resume()
    assert again.version == 100_000_000_000
