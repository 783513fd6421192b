"""The numeric half of an epoch: one pass of training, one held-out evaluation.

A base class of :class:`~esper.tolaria.trainer.TolariaTrainer` (which sets
the attributes declared here), so the optimizers and the step counter stay
public attributes of the trainer while the arithmetic lives in its own file.

Any task: a batch is ``(inputs, targets)``, the model is called as
``model(inputs)`` and the loss as ``loss(outputs, targets)`` (a scalar, the
batch mean), so classification, regression or anything else with a
differentiable loss trains the same way. Accuracy is measured only where it
means something, when the targets are class labels (:func:`batch_accuracy`);
other held-out measures come from the caller's ``metrics``.

Training yields to the event loop after every batch (after
``manager.step()``): the only points where commands and kernel attaches run.
Evaluation never yields, so a graft can never land half-way through it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from esper.core.logs import get_logger
from esper.tolaria.protocols import SeedManager
from esper.tolaria.records import Evaluation, LossFn, MetricFn, TrainingConfig, TrainStats

_log = get_logger("esper.tolaria")


def to_device(value: Any, device: torch.device) -> Any:
    """Tensors moved to ``device``, also inside tuples, lists and dicts; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of one batch, with a clear error for any other shape of batch."""
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError(
            f"each batch must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, tuple | list) else "")
        )
    inputs, targets = batch
    if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
        raise TypeError("the targets of a batch must be a tensor with a batch dimension")
    return inputs, targets


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> int | None:
    """Correct predictions in the batch when ``targets`` are class labels, else None.

    Class labels: an integer tensor ``[N]`` next to outputs ``[N, C]``
    (logits or scores); the prediction is the argmax.
    """
    if (
        targets.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        and targets.ndim == 1
        and outputs.ndim == 2
        and outputs.shape[0] == targets.shape[0]
    ):
        return int((outputs.detach().argmax(dim=1) == targets).sum())
    return None


def _scalar_loss(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TypeError("the loss function must return a scalar tensor (the batch mean)")
    return value.reshape(())


def _metric_value(name: str, value: float | torch.Tensor) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric {name!r} must return a float or a scalar tensor")
        return float(value.detach())
    return float(value)


class _Accuracy:
    """Counts correct predictions while every batch has class labels."""

    def __init__(self) -> None:
        self.correct = 0
        self.applicable = True

    def add(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        correct = batch_accuracy(outputs, targets)
        if correct is None:
            self.applicable = False
        else:
            self.correct += correct

    def value(self, seen: int) -> float | None:
        return self.correct / seen if self.applicable and seen else None


class EpochCompute:
    """Training and evaluation passes with ``manager``'s seeds grafted in."""

    config: TrainingConfig
    device: torch.device
    model: nn.Module
    manager: SeedManager
    train_data: Iterable[Any]
    validation_data: Iterable[Any]
    loss_fn: LossFn
    metric_fns: Mapping[str, MetricFn]
    training_run_id: str
    host_optimizer: torch.optim.Optimizer
    seed_optimizer: torch.optim.Optimizer | None
    _seed_param_ids: tuple[int, ...]
    global_step: int

    async def _train(self) -> TrainStats:
        model = self.model
        model.train()
        total_loss, seen, norms = 0.0, 0, []
        accuracy = _Accuracy()
        compute_s = 0.0
        for batch in self.train_data:
            began = time.perf_counter()
            inputs, targets = split_batch(batch)
            self._sync_seed_optimizer()
            x, y = to_device(inputs, self.device), targets.to(self.device)
            self.host_optimizer.zero_grad(set_to_none=True)
            if self.seed_optimizer is not None:
                self.seed_optimizer.zero_grad(set_to_none=True)
            outputs = model(x)
            loss = _scalar_loss(self.loss_fn(outputs, y))
            loss.backward()  # type: ignore[no-untyped-call]
            norms.append(self._global_grad_norm())
            self.host_optimizer.step()
            if self.seed_optimizer is not None:
                self.seed_optimizer.step()
            self.manager.step()
            self.global_step += 1
            size = int(y.shape[0])
            total_loss += float(loss.detach()) * size
            accuracy.add(outputs, y)
            seen += size
            compute_s += time.perf_counter() - began
            # The only point where commands and kernel attaches run: between batches.
            await asyncio.sleep(0)
        if seen == 0:
            _log.error("tolaria.zero_samples", training_run_id=self.training_run_id)
            return TrainStats(math.nan, None, 0.0, 0.0, 0)
        return TrainStats(
            loss=total_loss / seen,
            accuracy=accuracy.value(seen),
            gradient_norm=sum(norms) / len(norms),
            samples_per_s=seen / compute_s if compute_s > 0 else 0.0,
            samples=seen,
        )

    def evaluate(self) -> Evaluation:
        """Mean loss, accuracy (class labels only) and ``metrics`` of the current model, held out.

        Batch values are weighted by batch size, so the result is the mean
        over samples however the split is batched.
        """
        model = self.model
        was_training = model.training
        model.eval()
        total_loss, seen = 0.0, 0
        accuracy = _Accuracy()
        totals = dict.fromkeys(self.metric_fns, 0.0)
        try:
            with torch.no_grad():
                for batch in self.validation_data:
                    inputs, targets = split_batch(batch)
                    x, y = to_device(inputs, self.device), targets.to(self.device)
                    outputs = model(x)
                    size = int(y.shape[0])
                    total_loss += float(_scalar_loss(self.loss_fn(outputs, y))) * size
                    accuracy.add(outputs, y)
                    for name, metric in self.metric_fns.items():
                        totals[name] += _metric_value(name, metric(outputs, y)) * size
                    seen += size
        finally:
            model.train(was_training)
        if seen == 0:
            return Evaluation(math.nan, None, {name: math.nan for name in totals}, 0)
        return Evaluation(
            total_loss / seen, accuracy.value(seen), {k: v / seen for k, v in totals.items()}, seen
        )

    def parameter_count(self) -> int:
        """Host parameters plus those of every grafted kernel (kernels are outside the host's modules)."""
        host = sum(p.numel() for p in self.model.parameters())
        return host + sum(p.numel() for p in self.manager.seed_parameters())

    def _sync_seed_optimizer(self) -> None:
        """Rebuild the seed optimizer when the set of seed parameters changed."""
        params = [p for p in self.manager.seed_parameters() if p.requires_grad]
        ids = tuple(id(p) for p in params)
        if ids == self._seed_param_ids:
            return
        old = self.seed_optimizer
        self._seed_param_ids = ids
        if not params:
            self.seed_optimizer = None
            return
        fresh = torch.optim.Adam(params, lr=self.config.seed_lr)
        if old is not None:
            for p in params:  # kernels that stay keep their optimizer state
                if p in old.state:
                    fresh.state[p] = old.state[p]
        self.seed_optimizer = fresh
        _log.info("tolaria.seed_optimizer_rebuilt", parameters=len(params))

    def _global_grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64)
        for p in [*self.model.parameters(), *self.manager.seed_parameters()]:
            if p.grad is not None:
                squares += p.grad.detach().double().pow(2).sum().cpu()
        return float(squares.sqrt())
