"""What the demo shows a person: a live table, a summary and a plot of the run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from esper.leyline import leyline_pb2
from esper.tolaria import EpochResult

_HEADER = f"{'epoch':>5}  {'train loss':>10}  {'val loss':>9}  {'val acc':>7}  {'seeds':<44}  grafts"


def _stage(value: int) -> str:
    return leyline_pb2.SeedLifecycleStage.Name(value).removeprefix("SEED_STAGE_").lower()  # type: ignore[arg-type]


def print_header(out: TextIO) -> None:
    print(_HEADER, file=out)
    print("-" * len(_HEADER), file=out)


def print_epoch(result: EpochResult, out: TextIO) -> None:
    seeds = ", ".join(
        f"{s.seed_id}:{s.blueprint_id or '?'}:{_stage(s.stage_value)}@{s.alpha:.2f}" for s in result.seeds
    )
    grafts = ", ".join(result.grafted) or ""
    print(
        f"{result.epoch:>5}  {result.train_loss:>10.4f}  {result.validation_loss:>9.4f}  "
        f"{result.validation_accuracy or 0.0:>7.3f}  {seeds or '-':<44}  {grafts}",
        file=out,
        flush=True,
    )


def plot_run(results: Sequence[EpochResult], path: Path, title: str) -> Path:
    """Validation accuracy and losses per epoch, graft events marked; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in results]
    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    acc_ax.plot(
        epochs, [r.validation_accuracy or 0.0 for r in results], marker="o", label="validation accuracy"
    )
    acc_ax.plot(epochs, [r.train_accuracy or 0.0 for r in results], linestyle="--", label="training accuracy")
    acc_ax.set_ylabel("accuracy")
    acc_ax.legend(loc="lower right")
    loss_ax.plot(epochs, [r.validation_loss for r in results], marker="o", label="validation loss")
    loss_ax.plot(epochs, [r.train_loss for r in results], linestyle="--", label="training loss")
    loss_ax.set_ylabel("loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend(loc="upper right")
    for result in results:
        for graft in result.grafted:
            for ax in (acc_ax, loss_ax):
                ax.axvline(result.epoch, color="tab:green", alpha=0.6, linestyle=":")
            acc_ax.annotate(
                f"graft {graft}",
                (result.epoch, result.validation_accuracy or 0.0),
                textcoords="offset points",
                xytext=(4, -14),
                fontsize=8,
                color="tab:green",
            )
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
