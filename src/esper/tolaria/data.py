"""The bundled digits data set, split once into train and held-out validation.

scikit-learn ships the 8x8 handwritten digits inside its wheel, so a run
needs no download. The split is seeded, and validation never sees training
samples: reported validation accuracy is measured on held-out data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclass(frozen=True)
class DataSplits:
    train: DataLoader[tuple[torch.Tensor, ...]]
    validation: DataLoader[tuple[torch.Tensor, ...]]
    features: int
    classes: int
    train_size: int
    validation_size: int


def load_digits_splits(
    *, validation_fraction: float = 0.25, batch_size: int = 64, seed: int = 0, limit: int | None = None
) -> DataSplits:
    """Standardised digits features as float32 tensors, split train/validation."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError("validation_fraction must be between 0 and 1")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = torch.tensor(bunch.data, dtype=torch.float32)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    if limit is not None:
        order = order[:limit]
    n_val = max(1, int(len(order) * validation_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    mean = features[train_idx].mean(dim=0)
    std = features[train_idx].std(dim=0)
    # A pixel that never varies in the training split keeps its raw scale (as
    # scikit-learn's StandardScaler does) instead of being divided by ~0, which
    # would turn any held-out non-zero value into an enormous input.
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    features = (features - mean) / std
    train = TensorDataset(features[train_idx], labels[train_idx])
    validation = TensorDataset(features[val_idx], labels[val_idx])
    return DataSplits(
        train=DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator),
        validation=DataLoader(validation, batch_size=256, shuffle=False),
        features=features.shape[1],
        classes=int(labels.max().item()) + 1,
        train_size=len(train),
        validation_size=len(validation),
    )
