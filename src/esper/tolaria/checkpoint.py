"""Crash-safe training checkpoints.

Each epoch's checkpoint is ``ckpt-epoch-<n>.pt`` in the checkpoint
directory, written atomically (:func:`esper.core.files.write_atomic_with`):
``torch.save`` into a temporary file in the same directory, ``fsync``,
``os.replace`` onto the final name, then ``fsync`` of the directory. A
crash leaves either the previous complete checkpoint or the new one, never
a torn file. Loading uses ``torch.load(weights_only=True)``: a checkpoint
can carry tensors, numbers, strings and containers, never code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from esper.core.files import write_atomic_with

_NAME = re.compile(r"^ckpt-epoch-(\d+)\.pt$")


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return directory / f"ckpt-epoch-{epoch}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every complete checkpoint, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(directory: Path, epoch: int, state: dict[str, Any], *, keep: int | None = 3) -> Path:
    """Write ``state`` atomically as epoch ``epoch``; keep the newest ``keep`` checkpoints."""
    final = checkpoint_path(directory, epoch)
    # Owner-only, as when the temp file came from ``tempfile.mkstemp``.
    write_atomic_with(final, lambda handle: torch.save(state, handle), mode=0o600)
    if keep is not None and keep > 0:
        for _epoch, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code (``weights_only=True``)."""
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a Tolaria checkpoint")
    return state
