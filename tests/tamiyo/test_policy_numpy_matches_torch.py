"""The numpy policy the control plane runs decides exactly as the torch policy on the same weights.

The reference is the torch decision as Tamiyo made it before the control
plane dropped torch: an eval-mode forward pass under ``no_grad`` in float32,
argmax of the action and blueprint logits, ``tanh`` of the parameter and a
softmax over the action logits. It runs on :class:`PolicyNetwork` (the
module Simic trains) loaded with the very weights the numpy policy holds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tamiyo_support import make_state

from esper.leyline import leyline_pb2
from esper.tamiyo import FEATURE_DIM, PolicyAction, PolicyConfig, TamiyoPolicy, extract_features
from esper.tamiyo.features import FEATURE_CLIP
from esper.tamiyo.simic import PolicyNetwork

VECTORS = 2500
EXTREME = 500


def _torch_decide(network: PolicyNetwork, features: np.ndarray) -> tuple[int, int, float, list[float]]:
    """One decision exactly as the torch policy made it: one row, float32, eval mode, no_grad."""
    network.eval()
    with torch.no_grad():
        actions, blueprints, param = network(torch.from_numpy(features).reshape(1, -1).to(torch.float32))
    return (
        int(torch.argmax(actions[0]).item()),
        int(torch.argmax(blueprints[0]).item()),
        float(torch.tanh(param[0]).item()),
        torch.softmax(actions[0], dim=-1).tolist(),
    )


def _features(rng: np.random.Generator) -> np.ndarray:
    """Feature vectors as the controller produces them, then wide random ones, then extreme ones.

    The last :data:`EXTREME` rows fill the clipped range ``±FEATURE_CLIP``:
    at that scale float32 sums in a different order differ by ~1e-7 of the
    input's magnitude, so their outputs are compared with a tolerance scaled
    to it (their decisions must still be identical).
    """
    from_states = []
    stages = list(leyline_pb2.SeedLifecycleStage.values())
    for i in range(VECTORS // 5):
        state = make_state(
            run_id=f"run-{i}",
            epoch=int(rng.integers(0, 200)),
            validation_loss=float(rng.exponential(1.0)),
            validation_accuracy=float(rng.uniform()),
            seeds=tuple((f"seed-{k}", int(rng.choice(stages))) for k in range(int(rng.integers(0, 5)))),
        )
        state.training_metrics["gradient_norm"] = float(rng.exponential(3.0))
        trend = None if i % 7 == 0 else float(rng.normal(0.0, 0.2))
        from_states.append(extract_features(state, trend))
    wide = rng.normal(0.0, 3.0, (VECTORS - len(from_states) - EXTREME, FEATURE_DIM))
    extreme = rng.uniform(-FEATURE_CLIP, FEATURE_CLIP, (EXTREME, FEATURE_DIM))
    return np.concatenate([np.stack(from_states), wide, extreme]).astype(np.float32)


def _scaled(policy: TamiyoPolicy, factor: float) -> TamiyoPolicy:
    """Weights of a policy after training moved them well away from the initial ones."""
    return TamiyoPolicy(policy.config, {k: v * np.float32(factor) for k, v in policy.weights.items()})


@pytest.mark.parametrize(
    "policy",
    [
        TamiyoPolicy(),
        TamiyoPolicy(PolicyConfig(seed=5, growth_prior=False)),
        _scaled(TamiyoPolicy(PolicyConfig(seed=11, growth_prior=False)), 4.0),
        _scaled(
            TamiyoPolicy(
                PolicyConfig(
                    seed=3, hidden_dim=16, blueprint_candidates=("BP002", "BP009"), growth_prior=False
                )
            ),
            2.5,
        ),
    ],
    ids=["growth-prior", "plain", "trained-scale", "small"],
)
def test_numpy_and_torch_decide_identically(policy: TamiyoPolicy) -> None:
    features = _features(np.random.default_rng(2024))
    assert len(features) >= 2000
    network = PolicyNetwork(policy)
    reference = [_torch_decide(network, row) for row in features]
    decided = [policy.decide(row) for row in features]

    assert [int(d.action) for d in decided] == [r[0] for r in reference]
    assert [d.blueprint_index for d in decided] == [r[1] for r in reference]
    assert [d.blueprint_id for d in decided] == [policy.blueprint_candidates[r[1]] for r in reference]
    params = np.array([d.param for d in decided])
    probs = np.array([d.action_probs for d in decided])
    expected_params = np.array([r[2] for r in reference])
    expected_probs = np.array([r[3] for r in reference])
    ordinary = slice(0, len(features) - EXTREME)
    np.testing.assert_allclose(params[ordinary], expected_params[ordinary], rtol=0, atol=1e-5)
    np.testing.assert_allclose(probs[ordinary], expected_probs[ordinary], rtol=0, atol=1e-5)
    scaled = 1e-6 * FEATURE_CLIP
    extreme = slice(len(features) - EXTREME, None)
    np.testing.assert_allclose(params[extreme], expected_params[extreme], rtol=0, atol=scaled)
    np.testing.assert_allclose(probs[extreme], expected_probs[extreme], rtol=0, atol=scaled)

    # Batched, the two forward passes agree closely over the whole range.
    with torch.no_grad():
        batch = network(torch.from_numpy(features))
    for mine, theirs in zip(policy.forward(features), batch, strict=True):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-5, atol=1e-5)

    # The comparison means something: these policies really choose among actions and blueprints.
    assert len({r[1] for r in reference}) >= 2
    if not policy.config.growth_prior:
        assert len({r[0] for r in reference}) >= 2


def test_untrained_policy_decisions_follow_the_growth_prior_in_both_forms() -> None:
    policy = TamiyoPolicy()
    features = _features(np.random.default_rng(7))[: VECTORS // 5]  # realistic states only
    network = PolicyNetwork(policy)
    assert {_torch_decide(network, row)[0] for row in features} == {int(PolicyAction.GERMINATE)}
    assert {policy.decide(row).action for row in features} == {PolicyAction.GERMINATE}
