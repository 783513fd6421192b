"""What Tolaria is configured with and what it reports per epoch.

Plain records, kept apart from the loop so the demo, the reports and the
tests can use them without pulling in the trainer's machinery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from esper.leyline import leyline_pb2

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


@dataclass(frozen=True)
class TrainingConfig:
    """``command_wait_s`` > 0 makes every epoch wait up to that long for
    ``commands_per_epoch`` commands answering its state packet."""

    max_epochs: int
    lr: float = 1e-2
    seed_lr: float = 1e-2
    device: str = "cpu"
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
    """One pass over the training split (the epoch reports these)."""

    loss: float
    accuracy: float
    gradient_norm: float
    samples_per_s: float
    samples: int


@dataclass(frozen=True)
class EpochMeasures:
    """Everything an epoch measured: what its state and telemetry packets report."""

    train: TrainStats
    validation_loss: float
    validation_accuracy: float
    latency_ms: float


@dataclass
class EpochResult:
    """One epoch as the demo prints and plots it."""

    epoch: int
    global_step: int
    train_loss: float
    train_accuracy: float
    validation_loss: float
    validation_accuracy: float
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

    @property
    def seeds_active(self) -> int:
        return sum(1 for s in self.seeds if s.stage_value in LIVE_STAGES)


EpochCallback = Callable[[EpochResult], Awaitable[None] | None]
