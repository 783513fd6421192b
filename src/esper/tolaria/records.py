"""What Tolaria is configured with and what it reports per epoch.

Plain records, kept apart from the loop so the demo, the reports and the
tests can use them without pulling in the trainer's machinery.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esper.leyline import leyline_pb2
from esper.tolaria.decisions import ControllerDecision

_L = leyline_pb2
#: Stages in which a seed's kernel is grafted (counted by ``tolaria.seeds.active``).
LIVE_STAGES = frozenset(
    {
        _L.SEED_STAGE_GERMINATED,
        _L.SEED_STAGE_TRAINING,
        _L.SEED_STAGE_BLENDING,
        _L.SEED_STAGE_SHADOWING,
        _L.SEED_STAGE_PROBATIONARY,
        _L.SEED_STAGE_FOSSILIZED,
    }
)


#: ``loss(outputs, targets)``: a scalar tensor, the batch mean (as torch's losses return by default).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``metric(outputs, targets)``: the batch mean of a held-out measure, as a float or a 0-d tensor.
MetricFn = Callable[[torch.Tensor, torch.Tensor], float | torch.Tensor]
_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")


def check_metric_names(names: list[str]) -> None:
    """Metric names become bus metric names and Prometheus series: short snake_case only."""
    for name in names:
        if not _METRIC_NAME.match(name) or name in ("loss", "accuracy"):
            raise ValueError(
                f"metric name {name!r} must be snake_case (a-z, 0-9, _; at most 48 characters) "
                "and not 'loss' or 'accuracy', which Tolaria reports itself"
            )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when torch sees a GPU, else the CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class TrainingConfig:
    """``command_wait_s`` > 0 makes every epoch wait up to that long for
    ``commands_per_epoch`` commands answering its state packet; ``device``
    ``"auto"`` picks CUDA when present (see :func:`resolve_device`)."""

    max_epochs: int
    lr: float = 1e-2
    seed_lr: float = 1e-2
    device: str = "auto"
    checkpoint_dir: Path | None = None
    keep_checkpoints: int = 3
    experiment_name: str = "esper-lite"
    command_wait_s: float = 0.0
    commands_per_epoch: int = 1

    def __post_init__(self) -> None:
        if self.max_epochs < 0:
            raise ValueError("max_epochs must be >= 0")
        if self.lr <= 0 or self.seed_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.command_wait_s < 0:
            raise ValueError("command_wait_s must be >= 0")


@dataclass(frozen=True)
class SeedSummary:
    seed_id: str
    stage: str
    stage_value: int
    alpha: float
    blueprint_id: str
    age_epochs: int


@dataclass(frozen=True)
class CommandRecord:
    command_id: str
    command_type: str
    operation: str
    target_seed_id: str
    status: str
    reason: str


@dataclass(frozen=True)
class TrainStats:
    """One pass over the training split (the epoch reports these).

    ``accuracy`` is None unless the targets are class labels (see
    :func:`esper.tolaria.compute.batch_accuracy`).
    """

    loss: float
    accuracy: float | None
    gradient_norm: float
    samples_per_s: float
    samples: int


@dataclass(frozen=True)
class Evaluation:
    """The held-out split under the current model: mean loss, accuracy (class labels only), metrics."""

    loss: float
    accuracy: float | None
    metrics: dict[str, float]
    samples: int


@dataclass(frozen=True)
class EpochMeasures:
    """Everything an epoch measured: what its state and telemetry packets report."""

    train: TrainStats
    validation: Evaluation
    latency_ms: float
    parameters: int

    @property
    def validation_loss(self) -> float:
        return self.validation.loss

    @property
    def validation_accuracy(self) -> float | None:
        return self.validation.accuracy


@dataclass
class EpochResult:
    """One epoch as the demo prints and plots it.

    Accuracies are None when the targets are not class labels (regression);
    ``validation_metrics`` holds the trainer's ``metrics`` on the held-out
    split; ``parameters`` counts host and grafted seed parameters.
    """

    epoch: int
    global_step: int
    train_loss: float
    train_accuracy: float | None
    validation_loss: float
    validation_accuracy: float | None
    gradient_norm: float
    latency_ms: float
    samples_per_s: float
    seeds: list[SeedSummary]
    grafted: list[str]
    commands: list[CommandRecord]
    state: leyline_pb2.SystemStatePacket
    published: bool
    checkpoint: Path | None = None
    kasmina_packets: int = 0
    publish_failures: list[str] = field(default_factory=list)
    validation_metrics: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    #: The controller's decision on this epoch's state packet, when it was known in time.
    decision: ControllerDecision | None = None

    @property
    def seeds_active(self) -> int:
        return sum(1 for s in self.seeds if s.stage_value in LIVE_STAGES)


EpochCallback = Callable[[EpochResult], Awaitable[None] | None]
