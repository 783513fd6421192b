"""The alpha schedule that fades a grafted kernel in.

alpha(k) = sigmoid((k - total/2) / temperature) for blending step k = 1..total,
and exactly 1.0 once k >= total (the sigmoid never quite reaches 1, and a seed
that has finished blending must own its full share of the output). With the
defaults (20 steps, temperature 2) alpha is ~0.011 after one step, 0.5 after 10
and snaps to 1.0 at 20, so the blend is visible over many training steps
instead of esper-lite v1's single-command jump to PROBATIONARY.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AlphaSchedule:
    total_steps: int = 20
    temperature: float = 2.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")

    def alpha(self, step: int) -> float:
        """Blend weight after ``step`` blending steps (0 before blending starts)."""
        if step <= 0:
            return 0.0
        if self.total_steps <= 0 or step >= self.total_steps:
            return 1.0
        return 1.0 / (1.0 + math.exp(-(step - self.total_steps / 2) / self.temperature))

    def finished(self, step: int) -> bool:
        return step >= self.total_steps
