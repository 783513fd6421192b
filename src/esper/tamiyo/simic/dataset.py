"""Turning stored field reports into a training set for the policy.

Each usable report says: in this state (features) the policy took this
action (and blueprint), and this is how it went. Rewards use only the real
``FieldReportOutcome`` values (esper-lite v1 referenced a
nonexistent DEGRADED outcome): SUCCESS +1, NEUTRAL 0, REGRESSION -1,
ABORTED -1, plus ``-loss_delta`` when the report's metrics carry it.
UNSPECIFIED or unknown outcomes are skipped, not guessed.

Features come from the report's ``feature.<name>`` metrics (what the
controller records), or else from the SystemStatePacket the caller kept for
the command (``states`` keyed by command_id). Reports with neither, or with
no recoverable action, are skipped and counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from esper.leyline import leyline_pb2
from esper.tamiyo.decision import FEATURE_METRIC_PREFIX
from esper.tamiyo.features import FEATURE_NAMES, feature_values
from esper.tamiyo.policy import PolicyAction

OUTCOME_REWARD: dict[int, float] = {
    leyline_pb2.FIELD_REPORT_OUTCOME_SUCCESS: 1.0,
    leyline_pb2.FIELD_REPORT_OUTCOME_NEUTRAL: 0.0,
    leyline_pb2.FIELD_REPORT_OUTCOME_REGRESSION: -1.0,
    leyline_pb2.FIELD_REPORT_OUTCOME_ABORTED: -1.0,
}


@dataclass(frozen=True)
class TrainingSet:
    features: torch.Tensor  # (N, F) float32
    actions: torch.Tensor  # (N,) int64
    blueprints: torch.Tensor  # (N,) int64, -1 when no blueprint applies
    rewards: torch.Tensor  # (N,) float32
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def report_reward(report: leyline_pb2.FieldReport) -> float | None:
    """Reward for one report, or None when the outcome is not a real, known outcome."""
    base = OUTCOME_REWARD.get(int(report.outcome))
    if base is None:
        return None
    loss_delta = report.metrics.get("loss_delta")
    if loss_delta is not None and math.isfinite(loss_delta):
        base -= float(loss_delta)
    return base


def _features(
    report: leyline_pb2.FieldReport, states: Mapping[str, leyline_pb2.SystemStatePacket]
) -> list[float] | None:
    keys = [FEATURE_METRIC_PREFIX + name for name in FEATURE_NAMES]
    if all(key in report.metrics for key in keys):
        return [float(report.metrics[key]) for key in keys]
    state = states.get(report.command_id)
    if state is not None:
        return feature_values(state, None)
    return None


def _action(report: leyline_pb2.FieldReport) -> PolicyAction | None:
    raw = report.metrics.get("action")
    if raw is not None:
        try:
            return PolicyAction(int(raw))
        except ValueError:
            return None
    # Reports written by other tools: a blueprint means a germination.
    return PolicyAction.GERMINATE if report.blueprint_id else None


def build_training_set(
    reports: Iterable[leyline_pb2.FieldReport],
    candidates: Sequence[str],
    states: Mapping[str, leyline_pb2.SystemStatePacket] | None = None,
) -> TrainingSet:
    """Collect (features, action, blueprint, reward) rows from ``reports``."""
    states = states or {}
    rows_f: list[list[float]] = []
    rows_a: list[int] = []
    rows_b: list[int] = []
    rows_r: list[float] = []
    skipped = 0
    for report in reports:
        reward = report_reward(report)
        features = _features(report, states)
        action = _action(report)
        if reward is None or features is None or action is None:
            skipped += 1
            continue
        blueprint = -1
        if action is PolicyAction.GERMINATE and report.blueprint_id in candidates:
            blueprint = list(candidates).index(report.blueprint_id)
        rows_f.append(features)
        rows_a.append(int(action))
        rows_b.append(blueprint)
        rows_r.append(reward)
    width = len(FEATURE_NAMES)
    return TrainingSet(
        features=torch.tensor(rows_f, dtype=torch.float32).reshape(-1, width),
        actions=torch.tensor(rows_a, dtype=torch.int64),
        blueprints=torch.tensor(rows_b, dtype=torch.int64),
        rewards=torch.tensor(rows_r, dtype=torch.float32),
        skipped=skipped,
    )
