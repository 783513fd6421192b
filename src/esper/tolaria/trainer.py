"""Tolaria: the training loop that hosts Kasmina's seeds and reports to the bus.

One epoch (:meth:`TolariaTrainer.run_epoch`):

1. ``manager.update_epoch(n)``;
2. train over the training split: cross-entropy, a host optimizer over
   ``model.parameters()`` (seed kernels are outside ``_modules``, so never in
   it) and a separate seed optimizer over ``manager.seed_parameters()``,
   re-synchronised before every batch (kept parameters keep their Adam state,
   new kernels join, retired ones leave); ``manager.step()`` after each
   optimizer step; the gradient norm is the true global L2 norm over host and
   seed gradients of each step (the epoch reports their mean);
3. evaluate on the **held-out** split: real validation loss and accuracy
   (never training numbers, never forced: weakness 45);
4. checkpoint atomically (when ``checkpoint_dir`` is set);
5. publish a ``SystemStatePacket`` on ``oona.normal``, a ``tolaria``
   telemetry packet, and every Kasmina telemetry packet at its own priority
   (HIGH/CRITICAL go to ``oona.emergency``);
6. optionally wait (``command_wait_s``) for the controller's answer to the
   state just published: see :meth:`TolariaTrainer.wait_for_commands`.

Concurrency choice: compute runs **on the event loop**, yielding with
``await asyncio.sleep(0)`` after every batch (after ``manager.step()``).
Commands arrive asynchronously (a command intake calling
``manager.handle_command``, kernel attaches from the bus coordinator), and
they only ever run at those yield points: never during a forward or backward
pass, and always on the one thread that owns the manager. Digits-sized
batches take about a millisecond, so bus consumers stay responsive. (Running
compute in ``asyncio.to_thread`` would need a lock around every manager
call and every attach; it buys nothing at this scale.) Validation does not
yield, so a graft can never land half-way through an evaluation.

Tolaria does not import Kasmina (same package layer): the manager is typed
by the structural :class:`SeedManager` protocol, which
``esper.kasmina.KasminaSeedManager`` satisfies.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from esper.core.logs import get_logger
from esper.core.telemetry import TelemetryEvent, TelemetryMetric, build_telemetry_packet
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.tolaria.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from esper.tolaria.data import DataSplits

_L = leyline_pb2
_log = get_logger("esper.tolaria")
PRIORITY_INDICATOR = "priority"
CHECKPOINT_FORMAT = 1
#: Stages in which a seed's kernel is grafted (counted by ``tolaria.seeds.active``).
LIVE_STAGES = frozenset(
    {
        _L.SEED_STAGE_GERMINATED,
        _L.SEED_STAGE_TRAINING,
        _L.SEED_STAGE_BLENDING,
        _L.SEED_STAGE_SHADOWING,
        _L.SEED_STAGE_PROBATIONARY,
        _L.SEED_STAGE_FOSSILIZED,
    }
)


class SeedManager(Protocol):
    """What Tolaria needs from Kasmina's ``KasminaSeedManager``."""

    training_run_id: str

    @property
    def seeds(self) -> Mapping[str, Any]: ...

    def step(self, n: int = 1) -> None: ...

    def update_epoch(self, epoch: int) -> None: ...

    def export_seed_states(self) -> list[leyline_pb2.SeedState]: ...

    def free_slot_count(self) -> int: ...

    def seed_parameters(self, seed_id: str | None = None) -> list[nn.Parameter]: ...

    def build_telemetry(self, events: Iterable[TelemetryEvent] = ()) -> leyline_pb2.TelemetryPacket: ...

    def drain_telemetry(self) -> list[leyline_pb2.TelemetryPacket]: ...

    async def handle_command(self, command: leyline_pb2.AdaptationCommand) -> Any: ...


class Service(Protocol):
    """Something to run alongside training (command intake, kernel coordinator, consumers)."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class TrainingConfig:
    """``command_wait_s`` > 0 makes every epoch wait up to that long for
    ``commands_per_epoch`` commands answering its state packet."""

    max_epochs: int
    lr: float = 1e-2
    seed_lr: float = 1e-2
    device: str = "cpu"
    checkpoint_dir: Path | None = None
    keep_checkpoints: int = 3
    experiment_name: str = "esper-lite"
    command_wait_s: float = 0.0
    commands_per_epoch: int = 1

    def __post_init__(self) -> None:
        if self.max_epochs < 0:
            raise ValueError("max_epochs must be >= 0")
        if self.lr <= 0 or self.seed_lr <= 0:
            raise ValueError("learning rates must be positive")
        if self.command_wait_s < 0:
            raise ValueError("command_wait_s must be >= 0")


@dataclass(frozen=True)
class SeedSummary:
    seed_id: str
    stage: str
    stage_value: int
    alpha: float
    blueprint_id: str
    age_epochs: int


@dataclass(frozen=True)
class CommandRecord:
    command_id: str
    command_type: str
    operation: str
    target_seed_id: str
    status: str
    reason: str


@dataclass
class EpochResult:
    """One epoch as the demo prints and plots it."""

    epoch: int
    global_step: int
    train_loss: float
    train_accuracy: float
    validation_loss: float
    validation_accuracy: float
    gradient_norm: float
    latency_ms: float
    samples_per_s: float
    seeds: list[SeedSummary]
    grafted: list[str]
    commands: list[CommandRecord]
    state: leyline_pb2.SystemStatePacket
    published: bool
    checkpoint: Path | None = None
    kasmina_packets: int = 0
    publish_failures: list[str] = field(default_factory=list)

    @property
    def seeds_active(self) -> int:
        return sum(1 for s in self.seeds if s.stage_value in LIVE_STAGES)


EpochCallback = Callable[[EpochResult], Awaitable[None] | None]


class TolariaTrainer:
    """Trains ``model`` with ``manager``'s seeds grafted in; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        manager: SeedManager,
        data: DataSplits,
        *,
        client: OonaClient | None,
        training_run_id: str,
        config: TrainingConfig,
        services: Sequence[Service] = (),
    ) -> None:
        if not training_run_id:
            raise ValueError("training_run_id must not be empty")
        self.config = config
        self.device = torch.device(config.device)
        self.model = model.to(self.device)
        self.manager = manager
        self.data = data
        self.client = client
        self.training_run_id = training_run_id
        self.services = tuple(services)
        register = getattr(manager, "register_host_model", None)
        if callable(register) and getattr(manager, "host_model", None) is not model:
            register(model)
        self.host_optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.seed_optimizer: torch.optim.Optimizer | None = None
        self._seed_param_ids: tuple[int, ...] = ()
        self.epoch = 0
        self.global_step = 0
        self.history: list[EpochResult] = []
        self._commands: list[CommandRecord] = []
        self._reported_commands = 0
        self._since_state: list[CommandRecord] = []
        self._command_arrived = asyncio.Event()
        self._known_grafts: set[tuple[str, str]] = set()

    # -- commands ----------------------------------------------------------------------

    async def apply_command(self, command: leyline_pb2.AdaptationCommand) -> Any:
        """Hand ``command`` to the manager and record the outcome (use as an intake's handler)."""
        result = await self.manager.handle_command(command)
        self.notify_command(command, result)
        return result

    def notify_command(self, command: leyline_pb2.AdaptationCommand, result: Any = None) -> None:
        """Record a command some other component applied with ``manager.handle_command``.

        Wakes :meth:`wait_for_commands`. ``result`` is Kasmina's
        ``CommandResult`` (``status``/``reason``) or ``None``.
        """
        operation = ""
        if command.HasField("seed_operation"):
            operation = _L.SeedOperation.Name(command.seed_operation.operation)
        record = CommandRecord(
            command_id=command.command_id,
            command_type=_enum_name(_L.CommandType, command.command_type),
            operation=operation,
            target_seed_id=command.target_seed_id,
            status=str(getattr(result, "status", "unknown")),
            reason=str(getattr(result, "reason", "")),
        )
        self._commands.append(record)
        self._since_state.append(record)
        self._command_arrived.set()

    async def wait_for_commands(self, timeout_s: float, count: int = 1) -> list[CommandRecord]:
        """Wait until ``count`` commands were applied since the last state packet, or ``timeout_s``.

        Event driven (no polling); returns the commands seen since that packet.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while len(self._since_state) < count:
            self._command_arrived.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._command_arrived.wait(), remaining)
            except TimeoutError:
                break
        return list(self._since_state)

    # -- running -----------------------------------------------------------------------

    async def run(self, on_epoch: EpochCallback | None = None) -> list[EpochResult]:
        """Train until ``config.max_epochs`` (continuing after :meth:`resume`).

        ``services`` run as owned tasks for the duration and are stopped
        afterwards; ``on_epoch`` (sync or async) sees each result.
        """
        async with asyncio.TaskGroup() as group:
            for service in self.services:
                group.create_task(service.run(), name=f"tolaria-service:{type(service).__name__}")
            try:
                while self.epoch < self.config.max_epochs:
                    result = await self.run_epoch()
                    if on_epoch is not None:
                        outcome = on_epoch(result)
                        if inspect.isawaitable(outcome):
                            await outcome
            finally:
                for service in self.services:
                    await service.stop()
        return self.history

    async def run_epoch(self) -> EpochResult:
        epoch = self.epoch + 1
        self.manager.update_epoch(epoch)
        started = time.perf_counter()
        train = await self._train()
        validation_loss, validation_accuracy = self.evaluate()
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.epoch = epoch
        seeds = self.seed_summaries()
        grafted = self._new_grafts(seeds)
        state = self._state_packet(train, validation_loss, validation_accuracy, latency_ms)
        telemetry = self._telemetry_packet(train, validation_loss, validation_accuracy, latency_ms, seeds)
        self.manager.build_telemetry()
        kasmina_packets = self.manager.drain_telemetry()
        checkpoint = await self.save_checkpoint() if self.config.checkpoint_dir is not None else None
        self._since_state.clear()
        failures = await self._publish(state, telemetry, kasmina_packets)
        if self.config.command_wait_s > 0:
            await self.wait_for_commands(self.config.command_wait_s, self.config.commands_per_epoch)
        commands = self._commands[self._reported_commands :]
        self._reported_commands = len(self._commands)
        result = EpochResult(
            epoch=epoch,
            global_step=self.global_step,
            train_loss=train.loss,
            train_accuracy=train.accuracy,
            validation_loss=validation_loss,
            validation_accuracy=validation_accuracy,
            gradient_norm=train.gradient_norm,
            latency_ms=latency_ms,
            samples_per_s=train.samples_per_s,
            seeds=seeds,
            grafted=grafted,
            commands=commands,
            state=state,
            published=self.client is not None and not failures,
            checkpoint=checkpoint,
            kasmina_packets=len(kasmina_packets),
            publish_failures=failures,
        )
        self.history.append(result)
        _log.info(
            "tolaria.epoch",
            epoch=epoch,
            train_loss=round(train.loss, 5),
            validation_loss=round(validation_loss, 5),
            validation_accuracy=round(validation_accuracy, 5),
            seeds=[f"{s.seed_id}:{s.stage}" for s in seeds],
            latency_ms=round(latency_ms, 2),
        )
        return result

    # -- compute -----------------------------------------------------------------------

    async def _train(self) -> _TrainStats:
        model = self.model
        model.train()
        total_loss, correct, seen, norms = 0.0, 0, 0, []
        compute_s = 0.0
        for inputs, targets in self.data.train:
            began = time.perf_counter()
            self._sync_seed_optimizer()
            x, y = inputs.to(self.device), targets.to(self.device)
            self.host_optimizer.zero_grad(set_to_none=True)
            if self.seed_optimizer is not None:
                self.seed_optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()  # type: ignore[no-untyped-call]
            norms.append(self._global_grad_norm())
            self.host_optimizer.step()
            if self.seed_optimizer is not None:
                self.seed_optimizer.step()
            self.manager.step()
            self.global_step += 1
            batch = int(y.shape[0])
            total_loss += float(loss.detach()) * batch
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            seen += batch
            compute_s += time.perf_counter() - began
            # The only point where commands and kernel attaches run: between batches.
            await asyncio.sleep(0)
        if seen == 0:
            _log.error("tolaria.zero_samples", training_run_id=self.training_run_id)
            return _TrainStats(math.nan, 0.0, 0.0, 0.0, 0)
        return _TrainStats(
            loss=total_loss / seen,
            accuracy=correct / seen,
            gradient_norm=sum(norms) / len(norms),
            samples_per_s=seen / compute_s if compute_s > 0 else 0.0,
            samples=seen,
        )

    def evaluate(self) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current model on the held-out split."""
        model = self.model
        was_training = model.training
        model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        try:
            with torch.no_grad():
                for inputs, targets in self.data.validation:
                    x, y = inputs.to(self.device), targets.to(self.device)
                    logits = model(x)
                    total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                    correct += int((logits.argmax(dim=1) == y).sum())
                    seen += int(y.shape[0])
        finally:
            model.train(was_training)
        if seen == 0:
            return math.nan, 0.0
        return total_loss / seen, correct / seen

    def _sync_seed_optimizer(self) -> None:
        """Rebuild the seed optimizer when the set of seed parameters changed."""
        params = [p for p in self.manager.seed_parameters() if p.requires_grad]
        ids = tuple(id(p) for p in params)
        if ids == self._seed_param_ids:
            return
        old = self.seed_optimizer
        self._seed_param_ids = ids
        if not params:
            self.seed_optimizer = None
            return
        fresh = torch.optim.Adam(params, lr=self.config.seed_lr)
        if old is not None:
            for p in params:  # kernels that stay keep their optimizer state
                if p in old.state:
                    fresh.state[p] = old.state[p]
        self.seed_optimizer = fresh
        _log.info("tolaria.seed_optimizer_rebuilt", parameters=len(params))

    def _global_grad_norm(self) -> float:
        squares = torch.zeros((), dtype=torch.float64)
        for p in [*self.model.parameters(), *self.manager.seed_parameters()]:
            if p.grad is not None:
                squares += p.grad.detach().double().pow(2).sum().cpu()
        return float(squares.sqrt())

    # -- reporting ---------------------------------------------------------------------

    def seed_summaries(self) -> list[SeedSummary]:
        contexts = self.manager.seeds
        out = []
        for state in self.manager.export_seed_states():
            ctx = contexts.get(state.seed_id)
            out.append(
                SeedSummary(
                    seed_id=state.seed_id,
                    stage=_enum_name(_L.SeedLifecycleStage, state.stage),
                    stage_value=int(state.stage),
                    alpha=float(state.metrics.get("alpha", 0.0)),
                    blueprint_id=str(getattr(ctx, "blueprint_id", "")),
                    age_epochs=int(state.age_epochs),
                )
            )
        return out

    def _new_grafts(self, seeds: list[SeedSummary]) -> list[str]:
        current = {(s.seed_id, s.blueprint_id) for s in seeds if s.stage_value in LIVE_STAGES}
        new = sorted(f"{seed}:{blueprint}" for seed, blueprint in current - self._known_grafts)
        self._known_grafts = current
        return new

    def _state_packet(
        self, train: _TrainStats, validation_loss: float, validation_accuracy: float, latency_ms: float
    ) -> leyline_pb2.SystemStatePacket:
        packet = leyline_pb2.SystemStatePacket(
            version=1,
            current_epoch=self.epoch,
            validation_accuracy=validation_accuracy,
            validation_loss=validation_loss,
            training_loss=train.loss,
            timestamp_ns=time.time_ns(),
            packet_id=f"{self.training_run_id}-epoch-{self.epoch}",
            global_step=self.global_step,
            source_subsystem="tolaria",
            training_run_id=self.training_run_id,
            experiment_name=self.config.experiment_name,
        )
        packet.training_metrics.update(
            {
                "train_loss": train.loss,
                "train_accuracy": train.accuracy,
                "gradient_norm": train.gradient_norm,
                "epoch_latency_ms": latency_ms,
                "samples_per_s": train.samples_per_s,
                # Lets the controller defer a graft the model has no room for.
                "seed_slots_free": float(self.manager.free_slot_count()),
            }
        )
        packet.hardware_context.CopyFrom(_hardware_context(self.device))
        packet.seed_states.extend(self.manager.export_seed_states())
        return packet

    def _telemetry_packet(
        self,
        train: _TrainStats,
        validation_loss: float,
        validation_accuracy: float,
        latency_ms: float,
        seeds: list[SeedSummary],
    ) -> leyline_pb2.TelemetryPacket:
        active = sum(1 for s in seeds if s.stage_value in LIVE_STAGES)
        events = []
        level = _L.TELEMETRY_LEVEL_INFO
        health = _L.HEALTH_STATUS_HEALTHY
        if train.samples == 0:
            events.append(
                TelemetryEvent("zero_samples", _L.TELEMETRY_LEVEL_ERROR, {"epoch": str(self.epoch)})
            )
            level, health = _L.TELEMETRY_LEVEL_ERROR, _L.HEALTH_STATUS_UNHEALTHY
        return build_telemetry_packet(
            source="tolaria",
            packet_id=f"{self.training_run_id}-telemetry-{self.epoch}",
            level=level,
            metrics=[
                TelemetryMetric("tolaria.training.loss", train.loss, "loss"),
                TelemetryMetric("tolaria.training.accuracy", train.accuracy, "ratio"),
                TelemetryMetric("tolaria.validation.loss", validation_loss, "loss"),
                TelemetryMetric("tolaria.validation.accuracy", validation_accuracy, "ratio"),
                TelemetryMetric("tolaria.training.latency_ms", latency_ms, "ms"),
                TelemetryMetric("tolaria.training.gradient_norm", train.gradient_norm, "norm"),
                TelemetryMetric("tolaria.training.samples_per_s", train.samples_per_s, "samples/s"),
                TelemetryMetric("tolaria.seeds.active", active, "count"),
            ],
            events=events,
            health_status=health,
            health_summary="zero_samples" if train.samples == 0 else "nominal",
            health_indicators={
                PRIORITY_INDICATOR: "HIGH" if train.samples == 0 else "NORMAL",
                "training_run_id": self.training_run_id,
                "epoch": str(self.epoch),
            },
        )

    async def _publish(
        self,
        state: leyline_pb2.SystemStatePacket,
        telemetry: leyline_pb2.TelemetryPacket,
        kasmina_packets: list[leyline_pb2.TelemetryPacket],
    ) -> list[str]:
        """Publish everything; return a description of each refusal (never raises for one)."""
        client = self.client
        if client is None:
            return []
        failures = []
        result = await client.publish_state(state)
        if not result:
            failures.append(f"state:{result.reason}")
        for packet in [telemetry, *kasmina_packets]:
            result = await client.publish_telemetry(packet, priority=packet_priority(packet))
            if not result:
                failures.append(f"telemetry:{packet.source_subsystem}:{result.reason}")
        if failures:
            _log.warning("tolaria.publish_failed", epoch=self.epoch, failures=failures)
        return failures

    # -- checkpoints -------------------------------------------------------------------

    def checkpoint_state(self) -> dict[str, Any]:
        seeds: dict[str, Any] = {}
        for seed_id, ctx in self.manager.seeds.items():
            kernel = getattr(ctx, "kernel", None)
            if isinstance(kernel, nn.Module):
                seeds[seed_id] = {
                    "blueprint_id": str(getattr(ctx, "blueprint_id", "")),
                    "state_dict": kernel.state_dict(),
                }
        return {
            "format": CHECKPOINT_FORMAT,
            "training_run_id": self.training_run_id,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": self.model.state_dict(),
            "host_optimizer": self.host_optimizer.state_dict(),
            "seeds": seeds,
        }

    async def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the current epoch (written off the event loop)."""
        directory = self.config.checkpoint_dir
        if directory is None:
            raise ValueError("TrainingConfig.checkpoint_dir is not set")
        state = self.checkpoint_state()
        return await asyncio.to_thread(
            save_checkpoint, Path(directory), self.epoch, state, keep=self.config.keep_checkpoints
        )

    async def resume(self, path: Path | None = None) -> int | None:
        """Restore model, host optimizer, counters and matching seed kernels.

        Loads ``path`` or the latest checkpoint of ``checkpoint_dir``;
        returns the restored epoch, or ``None`` when there is none. Seed
        kernels are restored into seeds the manager already has (same id and
        blueprint); the seed optimizer starts fresh.
        """
        if path is None:
            if self.config.checkpoint_dir is None:
                return None
            path = latest_checkpoint(Path(self.config.checkpoint_dir))
            if path is None:
                return None
        state = await asyncio.to_thread(load_checkpoint, path, map_location=self.device)
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.host_optimizer.load_state_dict(state["host_optimizer"])
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        restored = 0
        for seed_id, saved in dict(state.get("seeds", {})).items():
            ctx = self.manager.seeds.get(seed_id)
            kernel = getattr(ctx, "kernel", None)
            if isinstance(kernel, nn.Module) and getattr(ctx, "blueprint_id", "") == saved["blueprint_id"]:
                kernel.load_state_dict(saved["state_dict"])
                restored += 1
        self.manager.update_epoch(self.epoch)
        _log.info("tolaria.resumed", path=str(path), epoch=self.epoch, seeds_restored=restored)
        return self.epoch


@dataclass(frozen=True)
class _TrainStats:
    loss: float
    accuracy: float
    gradient_norm: float
    samples_per_s: float
    samples: int


def packet_priority(packet: leyline_pb2.TelemetryPacket) -> leyline_pb2.MessagePriority.ValueType:
    """The ``priority`` health indicator (``HIGH`` or ``MESSAGE_PRIORITY_HIGH``); NORMAL if absent."""
    raw = packet.system_health.indicators.get(PRIORITY_INDICATOR, "").strip().upper()
    if not raw:
        return _L.MESSAGE_PRIORITY_NORMAL
    name = raw if raw.startswith("MESSAGE_PRIORITY_") else f"MESSAGE_PRIORITY_{raw}"
    try:
        return _L.MessagePriority.Value(name)
    except ValueError:
        return _L.MESSAGE_PRIORITY_NORMAL


def _enum_name(enum: Any, value: int) -> str:
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


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
