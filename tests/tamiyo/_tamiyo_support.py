"""Shared builders for the Tamiyo tests (real policies, real protobufs, no mocks)."""

from __future__ import annotations

import numpy as np

from esper.leyline import leyline_pb2
from esper.security import KeyRing
from esper.tamiyo import (
    DEFAULT_BLUEPRINT_CANDIDATES,
    PolicyAction,
    PolicyConfig,
    StaticBlueprintMetadata,
    TamiyoPolicy,
)

SECRET = b"tamiyo-test-secret-0123456789abcdef"


def keyring() -> KeyRing:
    return KeyRing(SECRET)


def descriptor(
    blueprint_id: str,
    *,
    risk: float = 0.1,
    quarantine_only: bool = False,
    tier: leyline_pb2.BlueprintTier.ValueType = leyline_pb2.BLUEPRINT_TIER_SAFE,
) -> leyline_pb2.BlueprintDescriptor:
    return leyline_pb2.BlueprintDescriptor(
        blueprint_id=blueprint_id,
        name=f"blueprint {blueprint_id}",
        tier=tier,
        risk=risk,
        stage=1,
        quarantine_only=quarantine_only,
    )


def safe_catalog(*overrides: leyline_pb2.BlueprintDescriptor) -> StaticBlueprintMetadata:
    table = {bp: descriptor(bp) for bp in DEFAULT_BLUEPRINT_CANDIDATES}
    for item in overrides:
        table[item.blueprint_id] = item
    return StaticBlueprintMetadata(table)


def biased_policy(action: PolicyAction, blueprint_id: str = "BP003", *, seed: int = 0) -> TamiyoPolicy:
    """A real policy whose heads always pick ``action`` and ``blueprint_id``."""
    base = TamiyoPolicy(PolicyConfig(seed=seed))
    weights = dict(base.weights)
    for head, pick in (
        ("action_head", int(action)),
        ("blueprint_head", base.blueprint_candidates.index(blueprint_id)),
    ):
        weights[f"{head}.weight"] = np.zeros_like(weights[f"{head}.weight"])
        bias = np.full_like(weights[f"{head}.bias"], -5.0)
        bias[pick] = 5.0
        weights[f"{head}.bias"] = bias
    return TamiyoPolicy(base.config, weights)


def make_state(
    *,
    run_id: str = "run-1",
    epoch: int = 3,
    validation_loss: float = 1.0,
    validation_accuracy: float = 0.5,
    timestamp_ns: int = 0,
    seeds: tuple[tuple[str, leyline_pb2.SeedLifecycleStage.ValueType], ...] = (),
) -> leyline_pb2.SystemStatePacket:
    state = leyline_pb2.SystemStatePacket(
        version=1,
        current_epoch=epoch,
        validation_loss=validation_loss,
        validation_accuracy=validation_accuracy,
        training_loss=validation_loss * 0.9,
        timestamp_ns=timestamp_ns,
        packet_id=f"{run_id}-epoch-{epoch}",
        training_run_id=run_id,
        source_subsystem="tolaria",
    )
    state.training_metrics["loss"] = validation_loss * 0.9
    state.training_metrics["accuracy"] = validation_accuracy
    state.training_metrics["gradient_norm"] = 2.5
    state.training_metrics["latency_ms"] = 12.0
    state.training_metrics["samples_per_s"] = 800.0
    for seed_id, stage in seeds:
        state.seed_states.add(seed_id=seed_id, stage=stage)
    return state


def weight_bytes(policy: TamiyoPolicy) -> dict[str, bytes]:
    """Exact bytes of every weight array, for byte-identical comparisons."""
    return {key: value.tobytes() for key, value in policy.weights.items()}
