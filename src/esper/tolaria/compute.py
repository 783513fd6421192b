"""The numeric half of an epoch: one pass of training, one held-out evaluation.

A base class of :class:`~esper.tolaria.trainer.TolariaTrainer` (which sets
the attributes declared here), so the optimizers and the step counter stay
public attributes of the trainer while the arithmetic lives in its own file.

Training yields to the event loop after every batch (after
``manager.step()``): the only points where commands and kernel attaches run.
Evaluation never yields, so a graft can never land half-way through it.
"""

from __future__ import annotations

import asyncio
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from esper.core.logs import get_logger
from esper.tolaria.data import DataSplits
from esper.tolaria.protocols import SeedManager
from esper.tolaria.records import TrainingConfig, TrainStats

_log = get_logger("esper.tolaria")


class EpochCompute:
    """Training and evaluation passes over ``data`` with ``manager``'s seeds grafted in."""

    config: TrainingConfig
    device: torch.device
    model: nn.Module
    manager: SeedManager
    data: DataSplits
    training_run_id: str
    host_optimizer: torch.optim.Optimizer
    seed_optimizer: torch.optim.Optimizer | None
    _seed_param_ids: tuple[int, ...]
    global_step: int

    async def _train(self) -> TrainStats:
        model = self.model
        model.train()
        total_loss, correct, seen, norms = 0.0, 0, 0, []
        compute_s = 0.0
        for inputs, targets in self.data.train:
            began = time.perf_counter()
            self._sync_seed_optimizer()
            x, y = inputs.to(self.device), targets.to(self.device)
            self.host_optimizer.zero_grad(set_to_none=True)
            if self.seed_optimizer is not None:
                self.seed_optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()  # type: ignore[no-untyped-call]
            norms.append(self._global_grad_norm())
            self.host_optimizer.step()
            if self.seed_optimizer is not None:
                self.seed_optimizer.step()
            self.manager.step()
            self.global_step += 1
            batch = int(y.shape[0])
            total_loss += float(loss.detach()) * batch
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += batch
            compute_s += time.perf_counter() - began
            # The only point where commands and kernel attaches run: between batches.
            await asyncio.sleep(0)
        if seen == 0:
            _log.error("tolaria.zero_samples", training_run_id=self.training_run_id)
            return TrainStats(math.nan, 0.0, 0.0, 0.0, 0)
        return TrainStats(
            loss=total_loss / seen,
            accuracy=correct / seen,
            gradient_norm=sum(norms) / len(norms),
            samples_per_s=seen / compute_s if compute_s > 0 else 0.0,
            samples=seen,
        )

    def evaluate(self) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current model on the held-out split."""
        model = self.model
        was_training = model.training
        model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        try:
            with torch.no_grad():
                for inputs, targets in self.data.validation:
                    x, y = inputs.to(self.device), targets.to(self.device)
                    logits = model(x)
                    total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
                    seen += int(y.shape[0])
        finally:
            model.train(was_training)
        if seen == 0:
            return math.nan, 0.0
        return total_loss / seen, correct / seen

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
