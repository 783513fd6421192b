"""What the demo shows a person: a live table, the three runs side by side, a summary and a plot.

Every column of a table has a fixed width except the last, which holds the
free text (the seeds), so rows stay aligned however many seeds grow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from esper.demo.baselines import RunReport
from esper.leyline import leyline_pb2
from esper.tolaria import EpochResult

_LIVE = (
    f"{'epoch':>5}  {'train loss':>10}  {'val loss':>8}  {'val acc':>7}  {'params':>7}  "
    "seeds (blueprint:stage@alpha)"
)


def _stage(value: int) -> str:
    return leyline_pb2.SeedLifecycleStage.Name(value).removeprefix("SEED_STAGE_").lower()  # type: ignore[arg-type]


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_header(out: TextIO) -> None:
    print(_LIVE, file=out)
    print("-" * len(_LIVE), file=out)


def print_epoch(result: EpochResult, out: TextIO) -> None:
    new = {graft.split(":", 1)[0] for graft in result.grafted}
    seeds = ", ".join(
        f"{s.seed_id}:{s.blueprint_id or '?'}:{_stage(s.stage_value)}@{s.alpha:.2f}"
        + (" (grafted)" if s.seed_id in new else "")
        for s in result.seeds
    )
    print(
        f"{result.epoch:>5}  {result.train_loss:>10.4f}  {result.validation_loss:>8.4f}  "
        f"{_accuracy(result.validation_accuracy):>7}  {result.parameters:>7}  {seeds or '-'}",
        file=out,
        flush=True,
    )


def print_comparison(runs: Sequence[RunReport], out: TextIO) -> None:
    """Held-out accuracy / loss of every run, one row per epoch."""
    width = max(18, *(len(run.name) for run in runs))
    header = (f"{'epoch':>5}  " + "  ".join(f"{run.name:<{width}}" for run in runs)).rstrip()
    print("", file=out)
    print("held-out accuracy / loss per epoch", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for index in range(max(len(run.results) for run in runs)):
        cells = []
        for run in runs:
            result = run.results[index] if index < len(run.results) else None
            cell = (
                ""
                if result is None
                else f"{_accuracy(result.validation_accuracy)} / {result.validation_loss:.4f}"
            )
            cells.append(f"{cell:<{width}}")
        print(f"{index + 1:>5}  " + "  ".join(cells).rstrip(), file=out)


def print_runs(runs: Sequence[RunReport], out: TextIO) -> None:
    """One line per run (final held-out numbers, parameters, times), then who did best, plainly."""
    width = max(len(run.name) for run in runs)
    header = (
        f"{'run':<{width}}  {'params':>7}  {'val acc':>7}  {'val loss':>8}  {'best loss':>9}  "
        f"{'wall time':>9}  {'compute':>7}"
    )
    print("", file=out)
    print(header, file=out)
    print("-" * len(header), file=out)
    for run in runs:
        final = run.final
        if final is None:
            print(f"{run.name:<{width}}  (no epochs)", file=out)
            continue
        print(
            f"{run.name:<{width}}  {run.parameters:>7}  {_accuracy(final.validation_accuracy):>7}  "
            f"{final.validation_loss:>8.4f}  {run.best_loss:>9.4f}  {run.wall_s:>8.1f}s  "
            f"{run.compute_s:>6.1f}s",
            file=out,
        )
    finished = [run for run in runs if run.final is not None]
    if not finished:
        return
    by_accuracy = max(finished, key=lambda run: run.final.validation_accuracy or 0.0)  # type: ignore[union-attr]
    by_loss = min(finished, key=lambda run: run.final.validation_loss)  # type: ignore[union-attr]
    print(
        f"highest final held-out accuracy: {by_accuracy.name}; lowest final held-out loss: {by_loss.name}",
        file=out,
    )
    print("(wall time of the grown run includes waiting for the controller after each epoch)", file=out)


def plot_runs(runs: Sequence[RunReport], path: Path, title: str) -> Path:
    """Held-out accuracy and loss of every run per epoch, the grown run's grafts marked; a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for run, style in zip(runs, ("-o", "--s", ":^"), strict=False):
        epochs = [r.epoch for r in run.results]
        accuracies = [
            math.nan if r.validation_accuracy is None else r.validation_accuracy for r in run.results
        ]
        label = f"{run.name} ({run.parameters} params)"
        acc_ax.plot(epochs, accuracies, style, label=label, markersize=4)
        loss_ax.plot(epochs, [r.validation_loss for r in run.results], style, label=label, markersize=4)
    grown = runs[0]
    for result in grown.results:
        for graft in result.grafted:
            for ax in (acc_ax, loss_ax):
                ax.axvline(result.epoch, color="tab:green", alpha=0.5, linestyle=":")
            acc_ax.annotate(
                f"graft {graft}",
                (result.epoch, result.validation_accuracy or 0.0),
                textcoords="offset points",
                xytext=(4, -14),
                fontsize=8,
                color="tab:green",
            )
    acc_ax.set_ylabel("held-out accuracy")
    acc_ax.legend(loc="lower right", fontsize=8)
    loss_ax.set_ylabel("held-out loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
