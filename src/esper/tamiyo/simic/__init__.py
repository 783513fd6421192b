"""Simic: offline policy improvement from Tamiyo's field reports (torch).

Training runs where the reports are, never inside the control plane:
:func:`train_policy_update` fits :class:`PolicyNetwork` (the policy as a
torch module) and returns a validated ``PolicyUpdate``, which
:func:`publish_simic_update` puts on the bus for every Tamiyo replica.
"""

from esper.tamiyo.simic.dataset import OUTCOME_REWARD, TrainingSet, build_training_set, report_reward
from esper.tamiyo.simic.network import PolicyNetwork
from esper.tamiyo.simic.publish import publish_simic_update
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
    "PolicyNetwork",
    "SimicConfig",
    "SimicRun",
    "TrainingResult",
    "TrainingSet",
    "build_training_set",
    "create_policy_update",
    "fit_policy",
    "publish_simic_update",
    "report_reward",
    "train_policy_update",
]
