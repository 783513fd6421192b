"""What Tolaria puts on the bus: the epoch's state and telemetry packets, and their priority.

Pure functions of the epoch's measures and the manager's seeds, so the
trainer only decides *when* to report and these decide *what*.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from esper.core.telemetry import (
    PRIORITY_INDICATOR,
    TelemetryEvent,
    TelemetryMetric,
    build_telemetry_packet,
    indicated_priority,
)
from esper.leyline import leyline_pb2
from esper.tolaria.protocols import SeedManager
from esper.tolaria.records import LIVE_STAGES, CommandRecord, EpochMeasures, SeedSummary

_L = leyline_pb2


def enum_name(enum: Any, value: int) -> str:
    """The enum value's name, or the number when Leyline has no such value."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def command_record(command: leyline_pb2.AdaptationCommand, result: Any) -> CommandRecord:
    """A command and Kasmina's ``CommandResult`` (``status``/``reason``, or ``None``) as a record."""
    operation = ""
    if command.HasField("seed_operation"):
        operation = _L.SeedOperation.Name(command.seed_operation.operation)
    return CommandRecord(
        command_id=command.command_id,
        command_type=enum_name(_L.CommandType, command.command_type),
        operation=operation,
        target_seed_id=command.target_seed_id,
        status=str(getattr(result, "status", "unknown")),
        reason=str(getattr(result, "reason", "")),
    )


def seed_summaries(manager: SeedManager) -> list[SeedSummary]:
    contexts = manager.seeds
    out = []
    for state in manager.export_seed_states():
        ctx = contexts.get(state.seed_id)
        out.append(
            SeedSummary(
                seed_id=state.seed_id,
                stage=enum_name(_L.SeedLifecycleStage, state.stage),
                stage_value=int(state.stage),
                alpha=float(state.metrics.get("alpha", 0.0)),
                blueprint_id=str(getattr(ctx, "blueprint_id", "")),
                age_epochs=int(state.age_epochs),
            )
        )
    return out


def state_packet(
    manager: SeedManager,
    measures: EpochMeasures,
    *,
    training_run_id: str,
    experiment_name: str,
    epoch: int,
    global_step: int,
    device: torch.device,
) -> leyline_pb2.SystemStatePacket:
    """The ``SystemStatePacket`` the controller decides on: held-out numbers, seeds, free slots.

    Without class labels there is no accuracy: the packet's
    ``validation_accuracy`` is 0 and ``train_accuracy`` is left out; the
    caller's held-out metrics travel as ``val_<name>``.
    """
    train = measures.train
    packet = leyline_pb2.SystemStatePacket(
        version=1,
        current_epoch=epoch,
        validation_accuracy=measures.validation_accuracy or 0.0,
        validation_loss=measures.validation_loss,
        training_loss=train.loss,
        timestamp_ns=time.time_ns(),
        packet_id=f"{training_run_id}-epoch-{epoch}",
        global_step=global_step,
        source_subsystem="tolaria",
        training_run_id=training_run_id,
        experiment_name=experiment_name,
    )
    packet.training_metrics.update(
        {
            "train_loss": train.loss,
            "gradient_norm": train.gradient_norm,
            "epoch_latency_ms": measures.latency_ms,
            "samples_per_s": train.samples_per_s,
            "parameters": float(measures.parameters),
            # Lets the controller defer a graft the model has no room for.
            "seed_slots_free": float(manager.free_slot_count()),
        }
    )
    if train.accuracy is not None:
        packet.training_metrics["train_accuracy"] = train.accuracy
    for name, value in measures.validation.metrics.items():
        packet.training_metrics[f"val_{name}"] = value
    packet.hardware_context.CopyFrom(_hardware_context(device))
    packet.seed_states.extend(manager.export_seed_states())
    return packet


def telemetry_packet(
    measures: EpochMeasures, seeds: list[SeedSummary], *, training_run_id: str, epoch: int
) -> leyline_pb2.TelemetryPacket:
    """The ``tolaria`` telemetry packet; HIGH priority and UNHEALTHY when the epoch saw no samples."""
    train = measures.train
    active = sum(1 for s in seeds if s.stage_value in LIVE_STAGES)
    events = []
    level = _L.TELEMETRY_LEVEL_INFO
    health = _L.HEALTH_STATUS_HEALTHY
    if train.samples == 0:
        events.append(TelemetryEvent("zero_samples", _L.TELEMETRY_LEVEL_ERROR, {"epoch": str(epoch)}))
        level, health = _L.TELEMETRY_LEVEL_ERROR, _L.HEALTH_STATUS_UNHEALTHY
    metrics = [
        TelemetryMetric("tolaria.training.loss", train.loss, "loss"),
        TelemetryMetric("tolaria.validation.loss", measures.validation_loss, "loss"),
        TelemetryMetric("tolaria.training.latency_ms", measures.latency_ms, "ms"),
        TelemetryMetric("tolaria.training.gradient_norm", train.gradient_norm, "norm"),
        TelemetryMetric("tolaria.training.samples_per_s", train.samples_per_s, "samples/s"),
        TelemetryMetric("tolaria.seeds.active", active, "count"),
        TelemetryMetric("tolaria.model.parameters", measures.parameters, "count"),
    ]
    if train.accuracy is not None:
        metrics.append(TelemetryMetric("tolaria.training.accuracy", train.accuracy, "ratio"))
    if measures.validation_accuracy is not None:
        metrics.append(TelemetryMetric("tolaria.validation.accuracy", measures.validation_accuracy, "ratio"))
    metrics.extend(
        TelemetryMetric(f"tolaria.validation.{name}", value)
        for name, value in measures.validation.metrics.items()
    )
    return build_telemetry_packet(
        source="tolaria",
        packet_id=f"{training_run_id}-telemetry-{epoch}",
        level=level,
        metrics=metrics,
        events=events,
        health_status=health,
        health_summary="zero_samples" if train.samples == 0 else "nominal",
        health_indicators={
            PRIORITY_INDICATOR: "HIGH" if train.samples == 0 else "NORMAL",
            "training_run_id": training_run_id,
            "epoch": str(epoch),
        },
    )


def _hardware_context(device: torch.device) -> leyline_pb2.HardwareContext:
    context = leyline_pb2.HardwareContext(device_type=device.type, device_id=str(device.index or 0))
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        context.total_memory_gb = total / 2**30
        context.available_memory_gb = free / 2**30
        return context
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        context.total_memory_gb = page * os.sysconf("SC_PHYS_PAGES") / 2**30
        context.available_memory_gb = page * os.sysconf("SC_AVPHYS_PAGES") / 2**30
        context.utilization_percent = min(100.0, 100.0 * os.getloadavg()[0] / (os.cpu_count() or 1))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX hosts
        pass
    return context


#: Kept under Tolaria's public name; the one implementation lives in ``esper.core.telemetry``.
packet_priority = indicated_priority
