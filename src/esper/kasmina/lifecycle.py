"""The seed lifecycle of esper-lite v1, with illegal moves reported, never swallowed.

Esper-lite v1's manager wrapped every transition in a blanket ``except`` so an
illegal move silently did nothing and the seed carried on in a
state nobody had agreed to. Here an illegal move calls the ``on_illegal``
hook (the manager turns it into an ``illegal_transition`` event) and then
raises :class:`IllegalTransition`, so the bug is both visible in telemetry
and impossible to ignore in code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeAlias

from esper.leyline import leyline_pb2

Stage: TypeAlias = leyline_pb2.SeedLifecycleStage.ValueType

_S = leyline_pb2
ALLOWED_TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    _S.SEED_STAGE_UNKNOWN: frozenset({_S.SEED_STAGE_DORMANT}),
    _S.SEED_STAGE_DORMANT: frozenset({_S.SEED_STAGE_GERMINATED, _S.SEED_STAGE_TERMINATED}),
    _S.SEED_STAGE_GERMINATED: frozenset({_S.SEED_STAGE_TRAINING, _S.SEED_STAGE_CULLED}),
    _S.SEED_STAGE_TRAINING: frozenset({_S.SEED_STAGE_BLENDING, _S.SEED_STAGE_CULLED}),
    _S.SEED_STAGE_BLENDING: frozenset({_S.SEED_STAGE_SHADOWING, _S.SEED_STAGE_CULLED}),
    _S.SEED_STAGE_SHADOWING: frozenset({_S.SEED_STAGE_PROBATIONARY, _S.SEED_STAGE_CULLED}),
    _S.SEED_STAGE_PROBATIONARY: frozenset({_S.SEED_STAGE_FOSSILIZED, _S.SEED_STAGE_CULLED}),
    _S.SEED_STAGE_FOSSILIZED: frozenset({_S.SEED_STAGE_TERMINATED}),
    _S.SEED_STAGE_CULLED: frozenset({_S.SEED_STAGE_EMBARGOED}),
    _S.SEED_STAGE_EMBARGOED: frozenset({_S.SEED_STAGE_RESETTING}),
    _S.SEED_STAGE_RESETTING: frozenset({_S.SEED_STAGE_DORMANT}),
    _S.SEED_STAGE_TERMINATED: frozenset(),
}

# Stages in which a seed holds a kernel that takes part in the forward pass.
ACTIVE_STAGES: frozenset[Stage] = frozenset(
    {
        _S.SEED_STAGE_TRAINING,
        _S.SEED_STAGE_BLENDING,
        _S.SEED_STAGE_SHADOWING,
        _S.SEED_STAGE_PROBATIONARY,
        _S.SEED_STAGE_FOSSILIZED,
    }
)


def stage_name(stage: Stage) -> str:
    """``SEED_STAGE_BLENDING`` -> ``BLENDING`` (for events and logs)."""
    return leyline_pb2.SeedLifecycleStage.Name(stage).removeprefix("SEED_STAGE_")


class IllegalTransition(ValueError):
    """A lifecycle move that esper-lite v1 does not allow."""

    def __init__(self, seed_id: str, current: Stage, target: Stage) -> None:
        super().__init__(
            f"seed {seed_id!r}: illegal transition {stage_name(current)} -> {stage_name(target)}"
        )
        self.seed_id = seed_id
        self.current = current
        self.target = target


class SeedLifecycle:
    """The current stage of one seed plus the rule book for moving it."""

    def __init__(
        self,
        seed_id: str,
        on_illegal: Callable[[IllegalTransition], None] | None = None,
        stage: Stage = leyline_pb2.SEED_STAGE_DORMANT,
    ) -> None:
        self.seed_id = seed_id
        self._stage: Stage = stage
        self._on_illegal = on_illegal

    @property
    def stage(self) -> Stage:
        return self._stage

    def can_transition(self, target: Stage) -> bool:
        return target == self._stage or target in ALLOWED_TRANSITIONS.get(self._stage, frozenset())

    def transition(self, target: Stage) -> bool:
        """Move to ``target``; returns False for a no-op (already there).

        Raises :class:`IllegalTransition` after reporting it through ``on_illegal``.
        """
        if target == self._stage:
            return False
        if target not in ALLOWED_TRANSITIONS.get(self._stage, frozenset()):
            error = IllegalTransition(self.seed_id, self._stage, target)
            if self._on_illegal is not None:
                self._on_illegal(error)
            raise error
        self._stage = target
        return True
