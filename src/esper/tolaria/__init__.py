"""Tolaria: the training loop hosting Kasmina's seeds, reporting through Oona.

Public API::

    from esper.kasmina import KasminaSeedManager, add_seed_slots
    from esper.tolaria import TolariaTrainer, TrainingConfig, build_host_model, load_digits_splits

    data = load_digits_splits(seed=0)
    model = build_host_model(data.features, data.classes, hidden=32, add_slots=add_seed_slots)
    manager = KasminaSeedManager(runtime=..., keys=keys, training_run_id="run-1")
    manager.register_host_model(model)
    trainer = TolariaTrainer(model, manager, data.train, data.validation, client=oona_client,
                             training_run_id="run-1", config=TrainingConfig(max_epochs=5, command_wait_s=2.0))
    results = await trainer.run(on_epoch=print)

Any task trains the same way: pass ``loss=`` (``nn.MSELoss()`` for
regression; cross-entropy by default) and ``metrics={"mae": fn}`` for other
held-out measures. :mod:`esper.grow` wires all of this to a running platform.
"""

from esper.tolaria.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from esper.tolaria.data import DataSplits, load_digits_splits
from esper.tolaria.decisions import ControllerDecision, DecisionReader
from esper.tolaria.model import DEFAULT_SLOTS, SLOT_POINTS, build_host_model
from esper.tolaria.packets import packet_priority
from esper.tolaria.protocols import SeedManager, Service
from esper.tolaria.records import (
    CommandRecord,
    EpochCallback,
    EpochResult,
    Evaluation,
    LossFn,
    MetricFn,
    SeedSummary,
    TrainingConfig,
    resolve_device,
)
from esper.tolaria.trainer import TolariaTrainer

__all__ = [
    "DEFAULT_SLOTS",
    "SLOT_POINTS",
    "CommandRecord",
    "ControllerDecision",
    "DataSplits",
    "DecisionReader",
    "EpochCallback",
    "EpochResult",
    "Evaluation",
    "LossFn",
    "MetricFn",
    "SeedManager",
    "SeedSummary",
    "Service",
    "TolariaTrainer",
    "TrainingConfig",
    "build_host_model",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_digits_splits",
    "packet_priority",
    "resolve_device",
    "save_checkpoint",
]
