"""Simic: fit the Tamiyo policy offline from field reports, emit a PolicyUpdate.

The objective is reward-weighted likelihood on the heads whose choice was
actually taken: a positive reward raises ``log p(taken)`` (cross-entropy
weighted by the reward), a negative reward lowers it through the bounded
unlikelihood term ``-log(1 - p(taken))`` (plain negative cross-entropy would
be unbounded below). The blueprint head trains only on germinations with a
known candidate. Training is full-batch with no sampling, so the same reports give
the same weights.

The update is validated before it is offered: the loss must be finite and
lower than where it started, otherwise :func:`create_policy_update` refuses.
Publishing is the caller's job; the payload is safetensors, never pickle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch.nn import functional

from esper.core import get_logger
from esper.leyline import leyline_pb2
from esper.tamiyo.field_reports import FieldReportStore
from esper.tamiyo.policy import TamiyoPolicy
from esper.tamiyo.registry import TamiyoPolicyRegistry, encode_policy
from esper.tamiyo.simic.dataset import TrainingSet, build_training_set
from esper.tamiyo.simic.network import PolicyNetwork

_LOG = get_logger(__name__)
_EPS = 1e-6


@dataclass(frozen=True)
class SimicConfig:
    epochs: int = 150
    learning_rate: float = 0.01
    #: Fewer usable reports than this and training is not attempted.
    min_samples: int = 1


@dataclass(frozen=True)
class TrainingResult:
    #: The fitted policy; the starting policy when training produced non-finite weights.
    policy: TamiyoPolicy
    initial_loss: float
    final_loss: float
    samples: int
    skipped: int
    passed: bool
    reason: str


def _taken_loss(logits: torch.Tensor, taken: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    log_probs = functional.log_softmax(logits, dim=-1).gather(1, taken.unsqueeze(1)).squeeze(1)
    positive = rewards.clamp(min=0.0) * -log_probs
    probs = log_probs.exp().clamp(max=1.0 - _EPS)
    negative = (-rewards).clamp(min=0.0) * -torch.log1p(-probs)
    return (positive + negative).sum()


def objective(network: PolicyNetwork, data: TrainingSet) -> torch.Tensor:
    """Mean reward-weighted loss over the action head and, where taken, the blueprint head."""
    action_logits, blueprint_logits, _ = network(data.features)
    total = _taken_loss(action_logits, data.actions, data.rewards)
    mask = data.blueprints >= 0
    if bool(mask.any()):
        total = total + _taken_loss(blueprint_logits[mask], data.blueprints[mask], data.rewards[mask])
    return total / max(1, len(data))


def fit_policy(policy: TamiyoPolicy, data: TrainingSet, config: SimicConfig | None = None) -> TrainingResult:
    """Train a torch copy of ``policy`` on ``data`` (policies are immutable; ``policy`` stays as it is)."""
    cfg = config or SimicConfig()
    if len(data) < cfg.min_samples or not bool((data.rewards != 0).any()):
        return TrainingResult(
            policy, math.nan, math.nan, len(data), data.skipped, False, "no_training_signal"
        )
    student = PolicyNetwork(policy)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.learning_rate)
    student.train()
    with torch.no_grad():
        initial = float(objective(student, data))
    for _ in range(cfg.epochs):
        optimizer.zero_grad()
        loss = objective(student, data)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    student.eval()
    with torch.no_grad():
        final = float(objective(student, data))
    finite = math.isfinite(final) and all(bool(torch.isfinite(p).all()) for p in student.parameters())
    passed = finite and final < initial
    reason = "ok" if passed else ("non_finite" if not finite else "loss_not_decreased")
    _LOG.info("simic.fit", samples=len(data), initial_loss=initial, final_loss=final, passed=passed)
    fitted = student.to_policy() if finite else policy
    return TrainingResult(fitted, initial, final, len(data), data.skipped, passed, reason)


def create_policy_update(
    result: TrainingResult,
    *,
    current_version: int,
    policy_id: str,
    training_run_id: str = "simic",
    clock: Callable[[], float] = time.time,
) -> leyline_pb2.PolicyUpdate:
    """A PolicyUpdate for a validated result: version ``current_version + 1`` in both fields."""
    if not result.passed:
        raise RuntimeError(f"refusing to publish an unvalidated policy ({result.reason})")
    version = current_version + 1
    update = leyline_pb2.PolicyUpdate(
        version=version,
        policy_id=policy_id,
        training_run_id=training_run_id,
        tamiyo_policy_version=str(version),
        payload=encode_policy(result.policy, version, policy_id, training_run_id),
    )
    update.issued_at.FromNanoseconds(int(clock() * 1e9))
    return update


@dataclass(frozen=True)
class SimicRun:
    result: TrainingResult
    update: leyline_pb2.PolicyUpdate | None


def train_policy_update(
    reports: FieldReportStore | Iterable[leyline_pb2.FieldReport],
    registry: TamiyoPolicyRegistry,
    *,
    states: Mapping[str, leyline_pb2.SystemStatePacket] | None = None,
    config: SimicConfig | None = None,
    policy_id: str | None = None,
    training_run_id: str = "simic",
    clock: Callable[[], float] = time.time,
) -> SimicRun:
    """One offline round: reports → training set → fit → validated PolicyUpdate (or None)."""
    items = reports.reports() if isinstance(reports, FieldReportStore) else list(reports)
    data = build_training_set(items, registry.policy.blueprint_candidates, states)
    result = fit_policy(registry.policy, data, config)
    if not result.passed:
        return SimicRun(result, None)
    update = create_policy_update(
        result,
        current_version=registry.version,
        policy_id=policy_id or registry.policy_id,
        training_run_id=training_run_id,
        clock=clock,
    )
    return SimicRun(result, update)
