"""Dispatch of verified adaptation commands.

Only called after :class:`~esper.kasmina.verification.CommandVerifier` has
accepted the command. Returns ``""`` when applied, else the rejection reason
(already counted and reported through ``record_rejection``); a rejected
command changes no seed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper.kasmina.core import INFO, WARNING
from esper.leyline import leyline_pb2

if TYPE_CHECKING:
    from esper.kasmina.seed_manager import KasminaSeedManager

_L = leyline_pb2


def _seed_id(command: leyline_pb2.AdaptationCommand) -> str:
    if command.target_seed_id:
        return command.target_seed_id
    value = command.seed_operation.parameters.get("seed_id") if command.HasField("seed_operation") else None
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


async def dispatch_command(manager: KasminaSeedManager, command: leyline_pb2.AdaptationCommand) -> str:
    kind = command.command_type
    cid = command.command_id
    payload = command.WhichOneof("payload")
    if kind == _L.COMMAND_SEED and payload == "seed_operation":
        op = command.seed_operation
        seed_id = _seed_id(command)
        manager.emit(
            "seed_operation",
            INFO,
            command_id=cid,
            seed_id=seed_id,
            blueprint_id=op.blueprint_id,
            operation=_L.SeedOperation.Name(op.operation),
        )
        if op.operation == _L.SEED_OP_GERMINATE:
            params = {k: v for k, v in op.parameters.items() if k != "seed_id"}
            return await manager.germinate(
                seed_id,
                op.blueprint_id,
                slot=command.annotations.get("slot") or None,
                parameters=params,
                training_run_id=command.annotations.get("training_run_id", ""),
                command_id=cid,
            )
        if op.operation in (_L.SEED_OP_CULL, _L.SEED_OP_CANCEL):
            if manager.get_seed(seed_id) is None:
                manager.record_rejection("unknown_seed", cid, seed_id=seed_id)
                return "unknown_seed"
            manager.retire(seed_id, reason=_L.SeedOperation.Name(op.operation).lower())
        return ""
    if kind == _L.COMMAND_CIRCUIT_BREAKER and payload == "circuit_breaker":
        cb = command.circuit_breaker
        if not manager.force_breaker(cb.desired_state, cb.rationale):
            manager.record_rejection("invalid_breaker_state", cid)
            return "invalid_breaker_state"
        return ""
    if kind == _L.COMMAND_OPTIMIZER:
        manager.emit(
            "optimizer_adjust", INFO, command_id=cid, optimizer_id=command.optimizer_adjustment.optimizer_id
        )
        return ""
    if kind == _L.COMMAND_PAUSE:
        seed_id = command.target_seed_id
        if manager.get_seed(seed_id) is None:
            manager.record_rejection("unknown_seed", cid, seed_id=seed_id)
            return "unknown_seed"
        if command.annotations.get("resume", "").lower() == "true":
            manager.resume(seed_id)
        else:
            manager.pause(seed_id)
        return ""
    if kind == _L.COMMAND_EMERGENCY:
        manager.emergency_cleanup()
        return ""
    manager.emit(
        "unsupported_command",
        WARNING,
        command_id=cid,
        command_type=_L.CommandType.Name(kind),
        payload=payload or "",
    )
    manager.record_rejection("unsupported_command", cid)
    return "unsupported_command"
