"""The demo's comparison runs: what growing is measured against.

Three runs on the same data split, batch order, initial host weights,
learning rate and number of epochs:

* **grown**: the host with seed slots, grown by the platform;
* **host only**: the same host without slots, never grown, so its curve is
  the grown run's until the first graft;
* **static**: a host whose hidden width gives it the grown model's *final*
  parameter count (as near as a whole hidden unit allows), trained from the
  start: did growth beat simply starting bigger?

The baselines train locally with the same Tolaria loop (no bus, no seeds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.nn.functional as F

from esper.kasmina import KasminaSeedManager
from esper.security import KeyRing
from esper.tolaria import EpochResult, TolariaTrainer, TrainingConfig, build_host_model, load_digits_splits


@dataclass
class RunReport:
    """One of the compared runs. ``wall_s`` includes any wait for the controller; ``compute_s`` does not."""

    name: str
    results: list[EpochResult]
    wall_s: float
    hidden: int
    grafts: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return self.results[-1].parameters if self.results else 0

    @property
    def compute_s(self) -> float:
        return sum(r.latency_ms for r in self.results) / 1000.0

    @property
    def final(self) -> EpochResult | None:
        return self.results[-1] if self.results else None

    @property
    def best_loss(self) -> float:
        return min((r.validation_loss for r in self.results), default=float("nan"))


def host_parameters(features: int, classes: int, hidden: int) -> int:
    """Parameters of :func:`~esper.tolaria.build_host_model`: three linear layers with biases."""
    return (features + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * classes


def width_for(parameters: int, features: int, classes: int) -> int:
    """The hidden width whose host has the parameter count nearest ``parameters``."""
    hidden = 1
    while host_parameters(features, classes, hidden + 1) <= parameters:
        hidden += 1
    return min((hidden, hidden + 1), key=lambda h: abs(host_parameters(features, classes, h) - parameters))


async def train_baseline(
    name: str, *, hidden: int, epochs: int, lr: float, limit: int | None, keys: KeyRing
) -> RunReport:
    """Train a host of ``hidden`` width without growth, locally, as the grown run was trained."""
    data = load_digits_splits(seed=0, limit=limit)
    model = build_host_model(data.features, data.classes, hidden=hidden, seed=0)
    manager = KasminaSeedManager(keys=keys, training_run_id=name)
    manager.register_host_model(model)
    trainer = TolariaTrainer(
        model,
        manager,
        data.train,
        data.validation,
        client=None,
        training_run_id=name,
        config=TrainingConfig(max_epochs=epochs, lr=lr, seed_lr=lr, experiment_name="esper-demo"),
        loss=F.cross_entropy,
    )
    started = time.monotonic()
    results = await trainer.run()
    return RunReport(name, results, time.monotonic() - started, hidden)
