"""An untrained policy has a documented growth prior instead of an arbitrary argmax."""

from __future__ import annotations

import numpy as np

from esper.leyline import leyline_pb2 as pb
from esper.tamiyo import PolicyAction, PolicyConfig, TamiyoPolicy, extract_features


def _state(epoch: int, loss: float) -> pb.SystemStatePacket:
    return pb.SystemStatePacket(
        current_epoch=epoch, validation_loss=loss, validation_accuracy=1 - loss, training_loss=loss
    )


def test_untrained_policy_prefers_growth_and_never_pauses() -> None:
    policy = TamiyoPolicy()
    for epoch, loss in [(1, 0.9), (3, 0.4), (10, 0.1), (50, 2.0)]:
        output = policy.decide(extract_features(_state(epoch, loss), 0.0))
        assert output.action is PolicyAction.GERMINATE


def test_prior_can_be_disabled_for_plain_initialisation() -> None:
    plain = TamiyoPolicy(PolicyConfig(growth_prior=False))
    grown = TamiyoPolicy()
    assert not np.array_equal(plain.weights["action_head.bias"], grown.weights["action_head.bias"])
    assert np.array_equal(plain.weights["encoder.0.weight"], grown.weights["encoder.0.weight"])
    assert set(plain.weights) == set(grown.weights)


def test_controller_defers_a_graft_when_the_model_has_no_free_slot(tmp_path: object) -> None:
    from pathlib import Path

    from esper.karn import KarnCatalog
    from esper.security import KeyRing
    from esper.tamiyo import FieldReportStore, StaticBlueprintMetadata, TamiyoController

    controller = TamiyoController(
        KeyRing(b"prior-test-secret-0123456789"),
        StaticBlueprintMetadata(KarnCatalog().all()),
        store=FieldReportStore(Path(str(tmp_path)) / "reports.log"),
    )
    full = _state(1, 0.5)
    full.training_run_id = "full"
    full.training_metrics["seed_slots_free"] = 0.0
    decision = controller.evaluate(full)
    assert decision.command is None
    assert "germination_deferred" in decision.events
    roomy = _state(1, 0.5)
    roomy.training_run_id = "roomy"
    roomy.training_metrics["seed_slots_free"] = 1.0
    assert controller.evaluate(roomy).command is not None
