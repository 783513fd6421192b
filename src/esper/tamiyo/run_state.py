"""Per-training-run memory and seed bookkeeping for the controller.

Loss trends and field reports need the previous epoch of the *same* run (the
esper-lite v1 kept one global "previous loss", so two runs corrupted each other's
spike detection). Runs come and go, so the table is an LRU with a fixed
capacity. Seed helpers read only ``state.seed_states``: Kasmina is the
authority on which seeds exist and in which stage.
"""

from __future__ import annotations

import base64
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError

from esper.leyline import leyline_pb2
from esper.tamiyo.policy import PolicyAction

#: Stages in which a graft is still in progress: no new germination meanwhile.
IN_FLIGHT_STAGES = frozenset(
    {
        leyline_pb2.SEED_STAGE_GERMINATED,
        leyline_pb2.SEED_STAGE_TRAINING,
        leyline_pb2.SEED_STAGE_BLENDING,
    }
)
#: Stages that occupy a slot towards ``max_seeds``.
LIVE_STAGES = IN_FLIGHT_STAGES | {
    leyline_pb2.SEED_STAGE_SHADOWING,
    leyline_pb2.SEED_STAGE_PROBATIONARY,
    leyline_pb2.SEED_STAGE_FOSSILIZED,
}
FAILED_STAGES = frozenset(
    {leyline_pb2.SEED_STAGE_CULLED, leyline_pb2.SEED_STAGE_EMBARGOED, leyline_pb2.SEED_STAGE_TERMINATED}
)
_SEED_ID = re.compile(r"^seed-(\d+)$")


@dataclass
class PendingCommand:
    """A command whose effect is reported on the run's next packet."""

    command: leyline_pb2.AdaptationCommand
    action: PolicyAction
    blueprint_index: int
    features: list[float]
    validation_loss: float
    validation_accuracy: float


@dataclass
class RunState:
    previous_loss: float | None = None
    previous_accuracy: float | None = None
    last_epoch: int = 0
    pending: PendingCommand | None = field(default=None)


def encode_run(run: RunState) -> dict[str, object]:
    """A JSON-ready view of ``run`` (the pending command as its serialized bytes)."""
    pending = run.pending
    return {
        "previous_loss": run.previous_loss,
        "previous_accuracy": run.previous_accuracy,
        "last_epoch": run.last_epoch,
        "pending": None
        if pending is None
        else {
            "command": base64.b64encode(pending.command.SerializeToString(deterministic=True)).decode(),
            "action": int(pending.action),
            "blueprint_index": pending.blueprint_index,
            "features": [float(v) for v in pending.features],
            "validation_loss": pending.validation_loss,
            "validation_accuracy": pending.validation_accuracy,
        },
    }


def decode_run(view: dict[str, object]) -> RunState:
    """The inverse of :func:`encode_run`; ``ValueError`` for anything malformed."""
    try:
        raw = view.get("pending")
        pending = None
        if raw is not None:
            if not isinstance(raw, dict):
                raise ValueError("pending is not an object")
            command = leyline_pb2.AdaptationCommand.FromString(base64.b64decode(raw["command"]))
            pending = PendingCommand(
                command=command,
                action=PolicyAction(int(raw["action"])),
                blueprint_index=int(raw["blueprint_index"]),
                features=[float(v) for v in raw["features"]],
                validation_loss=float(raw["validation_loss"]),
                validation_accuracy=float(raw["validation_accuracy"]),
            )
        loss, accuracy = view.get("previous_loss"), view.get("previous_accuracy")
        return RunState(
            previous_loss=None if loss is None else float(loss),  # type: ignore[arg-type]
            previous_accuracy=None if accuracy is None else float(accuracy),  # type: ignore[arg-type]
            last_epoch=int(view.get("last_epoch") or 0),  # type: ignore[call-overload]
            pending=pending,
        )
    except (KeyError, TypeError, ValueError, DecodeError) as exc:
        raise ValueError(f"malformed run state: {type(exc).__name__}") from None


class RunStateTable:
    """LRU of :class:`RunState` keyed by ``training_run_id``."""

    def __init__(self, capacity: int = 1024) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self._capacity = capacity
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_id: str) -> RunState:
        """The run's state, created on first sight (evicting the least recent run)."""
        with self._lock:
            state = self._runs.get(run_id)
            if state is None:
                state = RunState()
                self._runs[run_id] = state
                while len(self._runs) > self._capacity:
                    self._runs.popitem(last=False)
            self._runs.move_to_end(run_id)
            return state

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        with self._lock:
            return run_id in self._runs


def next_seed_id(seeds: Sequence[leyline_pb2.SeedState]) -> str:
    """``seed-<n>`` one past the highest numbered seed (``seed-1`` for none).

    Deterministic from the packet alone, so every Tamiyo replica picks the
    same slot and ids are never reused within a run.
    """
    highest = 0
    for seed in seeds:
        match = _SEED_ID.match(seed.seed_id)
        if match:
            highest = max(highest, int(match.group(1)))
    return f"seed-{highest + 1}"


def in_flight_seed(seeds: Sequence[leyline_pb2.SeedState]) -> str | None:
    """A seed still being grafted (the last listed one), if any."""
    found = [s.seed_id for s in seeds if s.stage in IN_FLIGHT_STAGES]
    return found[-1] if found else None


def live_seed_count(seeds: Sequence[leyline_pb2.SeedState]) -> int:
    return sum(1 for s in seeds if s.stage in LIVE_STAGES)


def pause_target(seeds: Sequence[leyline_pb2.SeedState]) -> str | None:
    """The seed a safety pause should address: an in-flight one, else the newest live one."""
    in_flight = in_flight_seed(seeds)
    if in_flight is not None:
        return in_flight
    live = [s.seed_id for s in seeds if s.stage in LIVE_STAGES - {leyline_pb2.SEED_STAGE_FOSSILIZED}]
    return live[-1] if live else None
