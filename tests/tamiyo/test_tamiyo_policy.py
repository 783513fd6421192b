from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from _tamiyo_support import make_state

from esper.leyline import leyline_pb2
from esper.tamiyo import FEATURE_DIM, FEATURE_NAMES, PolicyConfig, TamiyoPolicy, extract_features
from esper.tamiyo.policy import WeightsMismatch
from esper.tamiyo.simic import PolicyNetwork

_SCRIPT = textwrap.dedent(
    """
    import warnings
    warnings.filterwarnings("ignore")
    from esper.leyline import leyline_pb2
    from esper.tamiyo import TamiyoPolicy, PolicyConfig, extract_features
    state = leyline_pb2.SystemStatePacket(current_epoch=3, validation_loss=1.0, validation_accuracy=0.5,
                                          training_loss=0.9, training_run_id="run-x")
    state.training_metrics["gradient_norm"] = 2.5
    out = TamiyoPolicy(PolicyConfig(seed=7)).decide(extract_features(state, 0.05))
    print(out.action.name, out.blueprint_id, repr(out.param), repr(out.action_probs))
    """
)


def test_feature_vector_layout_is_fixed() -> None:
    features = extract_features(make_state(), None)
    assert features.shape == (FEATURE_DIM,)
    assert features.dtype == np.float32
    assert FEATURE_NAMES[:5] == (
        "validation_loss",
        "validation_accuracy",
        "training_loss",
        "log_epoch",
        "loss_trend",
    )
    assert FEATURE_NAMES[8] == "seeds_dormant"
    assert FEATURE_NAMES[18] == "seeds_terminated"
    assert len(set(FEATURE_NAMES)) == FEATURE_DIM


def test_features_sanitize_non_finite_and_count_stages() -> None:
    state = make_state(
        seeds=(("seed-1", leyline_pb2.SEED_STAGE_TRAINING), ("seed-2", leyline_pb2.SEED_STAGE_TRAINING))
    )
    state.validation_loss = float("nan")
    values = dict(zip(FEATURE_NAMES, extract_features(state, 0.2).tolist(), strict=True))
    assert values["validation_loss"] == 0.0
    assert values["seeds_training"] == 2.0
    assert values["seeds_total"] == 2.0
    assert abs(values["loss_trend"] - 0.2) < 1e-6
    assert values["has_previous"] == 1.0


def test_decision_is_deterministic_and_weights_cannot_change_underneath() -> None:
    policy = TamiyoPolicy()
    features = extract_features(make_state(), 0.01)
    first = policy.decide(features)
    assert policy.decide(features.tolist()) == first  # plain floats or an array
    assert TamiyoPolicy().decide(features) == first  # same seed, fresh policy
    with pytest.raises(ValueError, match="read-only"):
        policy.weights["action_head.bias"][0] = 99.0
    with pytest.raises(TypeError):
        policy.weights["action_head.bias"] = np.zeros(4, dtype=np.float32)  # type: ignore[index]
    assert policy.decide(features) == first


def test_weights_must_fit_the_interface() -> None:
    good = dict(TamiyoPolicy().weights)
    cases = {
        "key_mismatch": {k: v for k, v in good.items() if k != "param_head.bias"},
        "shape_mismatch": {**good, "param_head.bias": np.zeros(2, dtype=np.float32)},
        "dtype_mismatch": {**good, "param_head.bias": np.zeros(1, dtype=np.float64)},
        "non_finite": {**good, "param_head.bias": np.array([np.nan], dtype=np.float32)},
    }
    for reason, weights in cases.items():
        with pytest.raises(WeightsMismatch) as info:
            TamiyoPolicy(PolicyConfig(), weights)
        assert info.value.reason == reason
    with pytest.raises(ValueError, match="shape"):
        TamiyoPolicy().decide(np.zeros(FEATURE_DIM + 1))


def test_same_seed_gives_same_action_across_processes() -> None:
    runs = [
        subprocess.run(
            [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    state = leyline_pb2.SystemStatePacket(
        current_epoch=3,
        validation_loss=1.0,
        validation_accuracy=0.5,
        training_loss=0.9,
        training_run_id="run-x",
    )
    state.training_metrics["gradient_norm"] = 2.5
    out = TamiyoPolicy(PolicyConfig(seed=7)).decide(extract_features(state, 0.05))
    assert runs[0] == f"{out.action.name} {out.blueprint_id} {out.param!r} {out.action_probs!r}"


def test_init_does_not_touch_global_rngs() -> None:
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (np.random.rand(3), torch.rand(3))
    np.random.seed(123)
    torch.manual_seed(123)
    policy = TamiyoPolicy(PolicyConfig(seed=99))
    PolicyNetwork(policy)
    assert np.array_equal(np.random.rand(3), expected[0])
    assert torch.equal(torch.rand(3), expected[1])


def test_interface_lists_keys_and_shapes_of_both_forms() -> None:
    policy = TamiyoPolicy()
    interface = policy.interface()
    assert interface["blueprint_head.weight"] == (7, 64)
    assert interface["action_head.bias"] == (4,)
    assert interface["encoder.0.weight"] == (64, FEATURE_DIM)
    assert {k: v.shape for k, v in policy.weights.items()} == interface
    network = PolicyNetwork(policy)
    assert {k: tuple(v.shape) for k, v in network.state_dict().items()} == interface
    back = network.to_policy()
    assert all(np.array_equal(back.weights[k], policy.weights[k]) for k in interface)
