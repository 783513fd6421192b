"""Simic: offline policy improvement from Tamiyo's field reports."""

from esper.tamiyo.simic.dataset import OUTCOME_REWARD, TrainingSet, build_training_set, report_reward
from esper.tamiyo.simic.trainer import (
    SimicConfig,
    SimicRun,
    TrainingResult,
    create_policy_update,
    fit_policy,
    train_policy_update,
)

__all__ = [
    "OUTCOME_REWARD",
    "SimicConfig",
    "SimicRun",
    "TrainingResult",
    "TrainingSet",
    "build_training_set",
    "create_policy_update",
    "fit_policy",
    "report_reward",
    "train_policy_update",
]
