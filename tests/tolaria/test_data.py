"""The digits split: disjoint, seeded, and sanely scaled on held-out data."""

from __future__ import annotations

import torch

from esper.tolaria import load_digits_splits


def test_split_is_disjoint_seeded_and_bounded() -> None:
    a = load_digits_splits(seed=3)
    b = load_digits_splits(seed=3)
    assert a.train_size + a.validation_size == 1797
    assert (a.features, a.classes) == (64, 10)
    xa = torch.cat([x for x, _ in a.validation])
    xb = torch.cat([x for x, _ in b.validation])
    assert torch.equal(xa, xb)
    # Pixels constant in the training split are not divided by ~0: held-out inputs stay bounded.
    assert float(xa.abs().max()) < 100.0
    train_rows = {tuple(row.tolist()) for x, _ in a.train for row in x}
    assert len(train_rows & {tuple(row.tolist()) for row in xa}) < 5  # digits has a few duplicate images
