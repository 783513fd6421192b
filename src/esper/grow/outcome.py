"""What a growth run returns: every epoch, the grafts, and, when nothing grew, why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from esper.tolaria import EpochResult

GERMINATE = "SEED_OP_GERMINATE"


@dataclass
class GrowthRun:
    """One training run on the platform.

    ``seed_failures`` maps a seed that was culled (or fell back to a
    placeholder kernel) to Kasmina's reason.
    """

    run_id: str
    results: list[EpochResult]
    elapsed_s: float
    command_wait_s: float
    seed_failures: dict[str, str] = field(default_factory=dict)

    @property
    def grafts(self) -> list[str]:
        """``epoch 3: seed-1:BP012`` for every seed grafted, in order."""
        return [f"epoch {r.epoch}: {graft}" for r in self.results for graft in r.grafted]

    @property
    def grafted(self) -> bool:
        return bool(self.grafts)

    @property
    def parameters(self) -> int:
        """Host plus grafted seed parameters after the last epoch."""
        return self.results[-1].parameters if self.results else 0

    def no_graft_reason(self) -> str:
        """Why no seed was grafted (empty when one was), from the commands, seeds and decisions seen."""
        if self.grafted:
            return ""
        results = self.results
        if not results:
            return "no epoch ran"
        if len(results) == 1:
            return (
                "seeds are grafted between epochs, in answer to an epoch's report, "
                "so a 1-epoch run cannot graft: train for 2 epochs or more"
            )
        commands = [c for r in results for c in r.commands]
        refused = sorted(
            {c.reason or c.status for c in commands if c.operation == GERMINATE and c.status != "applied"}
        )
        if refused:
            return f"Kasmina refused the controller's GERMINATE: {', '.join(refused)}"
        if self.seed_failures:
            return "; ".join(f"{seed} failed: {why}" for seed, why in sorted(self.seed_failures.items()))
        if any(c.operation == GERMINATE for c in results[-1].commands):
            return "the controller's first GERMINATE came after the last epoch: train for more epochs"
        decisions = Counter(r.decision.describe() for r in results if r.decision is not None)
        if decisions:
            said = "; ".join(
                f"{text} ({count} epoch{'s' if count > 1 else ''})" for text, count in decisions.most_common()
            )
            return f"the controller germinated nothing; it decided: {said}"
        if commands:
            kinds = ", ".join(sorted({c.operation or c.command_type for c in commands}))
            return f"the controller sent no GERMINATE (only {kinds})"
        return (
            f"the controller did not answer any epoch within {self.command_wait_s:g}s: "
            "is Weatherlight's Tamiyo running on this bus? (see its log)"
        )
