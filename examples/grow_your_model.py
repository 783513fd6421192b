"""Grow your own model: a regression MLP on scikit-learn's diabetes data, grown by the platform.

Start the platform first, in this directory (it keeps its state under ./var
and, with ``esper-config init``, its secret in .env)::

    esper-weatherlight-service &
    python examples/grow_your_model.py --epochs 20

Each epoch prints the held-out mean squared error (on standardised targets)
and mean absolute error (in the data set's units), the model's parameter
count and its seeds. Exits 1 with a clear message when no platform answers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import torch
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import esper.grow
from esper.core.logs import configure_logging
from esper.tolaria import EpochResult

Loaders = tuple[DataLoader[tuple[torch.Tensor, ...]], DataLoader[tuple[torch.Tensor, ...]], float]


def diabetes_loaders(seed: int) -> Loaders:
    """A seeded 75/25 split; targets standardised on the training split (returns their std too)."""
    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32).unsqueeze(1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    held_out, train = order[: len(x) // 4], order[len(x) // 4 :]
    mean, std = y[train].mean(), y[train].std()
    x = (x - x[train].mean(dim=0)) / x[train].std(dim=0)
    y = (y - mean) / std
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True, generator=generator),
        DataLoader(TensorDataset(x[held_out], y[held_out]), batch_size=128),
        float(std),
    )


def build_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


async def grow(epochs: int, seed: int) -> esper.grow.GrowthRun:
    train, held_out, target_std = diabetes_loaders(seed)

    def mae(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs - targets).abs().mean() * target_std  # in the data set's units

    def show(result: EpochResult) -> None:
        seeds = ", ".join(
            f"{s.seed_id}:{s.blueprint_id}:{s.stage.removeprefix('SEED_STAGE_').lower()}"
            for s in result.seeds
        )
        print(
            f"epoch {result.epoch:>3}  held-out MSE {result.validation_loss:.4f}  "
            f"MAE {result.validation_metrics['mae']:6.2f}  parameters {result.parameters:>6}  "
            f"seeds: {seeds or '-'}",
            flush=True,
        )

    async with esper.grow.connect() as platform:
        print(f"connected to the platform at {platform.bus}", flush=True)
        model = platform.add_seeds(build_model(seed), {"0": 32, "2": 32})
        return await platform.train(
            model,
            train,
            held_out,
            loss=nn.MSELoss(),
            metrics={"mae": mae},
            epochs=epochs,
            lr=3e-3,
            on_epoch=show,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging("WARNING")
    try:
        run = asyncio.run(grow(args.epochs, args.seed))
    except esper.grow.PlatformUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    first, last = run.results[0], run.results[-1]
    print(f"held-out MSE {first.validation_loss:.4f} -> {last.validation_loss:.4f} in {run.elapsed_s:.1f}s")
    print(f"parameters {first.parameters} -> {last.parameters}")
    print(f"grafts: {'; '.join(run.grafts) if run.grafted else 'none (' + run.no_graft_reason() + ')'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
