"""Tolaria: the training loop that hosts Kasmina's seeds and reports to the bus.

One epoch (:meth:`TolariaTrainer.run_epoch`):

1. ``manager.update_epoch(n)``;
2. train over the training batches ``(inputs, targets)`` with the caller's
   ``loss`` (cross-entropy by default; any scalar loss, regression included),
   a host optimizer over
   ``model.parameters()`` (seed kernels are outside ``_modules``, so never in
   it) and a separate seed optimizer over ``manager.seed_parameters()``,
   re-synchronised before every batch (kept parameters keep their Adam state,
   new kernels join, retired ones leave); ``manager.step()`` after each
   optimizer step; the gradient norm is the true global L2 norm over host and
   seed gradients of each step (the epoch reports their mean);
3. evaluate on the **held-out** batches: real validation loss, accuracy when
   the targets are class labels, and the caller's ``metrics`` (never training
   numbers, never forced);
4. checkpoint atomically (when ``checkpoint_dir`` is set);
5. publish a ``SystemStatePacket`` on ``oona.normal``, a ``tolaria``
   telemetry packet, and every Kasmina telemetry packet at its own priority
   (HIGH/CRITICAL go to ``oona.emergency``);
6. optionally wait (``command_wait_s``) for the controller's answer to the
   state just published: see :meth:`TolariaTrainer.wait_for_commands` (with a
   :class:`~esper.tolaria.decisions.DecisionReader` among the services the
   wait ends as soon as the controller has decided).

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
by the structural :class:`~esper.tolaria.protocols.SeedManager` protocol,
which ``esper.kasmina.KasminaSeedManager`` satisfies.

This module holds the loop and its bookkeeping; the arithmetic of an epoch
is in :mod:`esper.tolaria.compute`, the wait for the controller's answer in
:mod:`esper.tolaria.answers`, what goes on the bus in
:mod:`esper.tolaria.packets`, and the config and result records in
:mod:`esper.tolaria.records`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext, run_children
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.tolaria import packets
from esper.tolaria.answers import ControllerAnswers
from esper.tolaria.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from esper.tolaria.compute import EpochCompute
from esper.tolaria.packets import packet_priority
from esper.tolaria.protocols import SeedManager, Service
from esper.tolaria.records import (
    LIVE_STAGES,
    EpochCallback,
    EpochMeasures,
    EpochResult,
    LossFn,
    MetricFn,
    SeedSummary,
    TrainingConfig,
    check_metric_names,
    resolve_device,
)

_log = get_logger("esper.tolaria")
CHECKPOINT_FORMAT = 1


class TolariaTrainer(EpochCompute, ControllerAnswers):
    """Trains ``model`` with ``manager``'s seeds grafted in; see the module docstring.

    ``train`` and ``validation`` are re-iterable sources of ``(inputs,
    targets)`` batches (e.g. ``DataLoader``\\ s), iterated once per epoch;
    ``loss(outputs, targets)`` returns the batch mean; ``metrics`` name other
    held-out measures (``{"mae": fn}``), reported per epoch and on the bus.
    """

    def __init__(
        self,
        model: nn.Module,
        manager: SeedManager,
        train: Iterable[Any],
        validation: Iterable[Any],
        *,
        client: OonaClient | None,
        training_run_id: str,
        config: TrainingConfig,
        loss: LossFn = F.cross_entropy,
        metrics: Mapping[str, MetricFn] | None = None,
        services: Sequence[Service] = (),
    ) -> None:
        if not training_run_id:
            raise ValueError("training_run_id must not be empty")
        metric_fns = dict(metrics or {})
        check_metric_names(list(metric_fns))
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.manager = manager
        self.train_data = train
        self.validation_data = validation
        self.loss_fn = loss
        self.metric_fns = metric_fns
        self.client = client
        self.training_run_id = training_run_id
        self.services = tuple(services)
        register = getattr(manager, "register_host_model", None)
        if callable(register) and getattr(manager, "host_model", None) is not model:
            register(model)
        self.host_optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.seed_optimizer = None
        self._seed_param_ids = ()
        self.epoch = 0
        self.global_step = 0
        self.history: list[EpochResult] = []
        self._init_answers()
        self._reported_commands = 0
        self._known_grafts: set[tuple[str, str]] = set()

    # -- running -----------------------------------------------------------------------

    async def run(self, on_epoch: EpochCallback | None = None) -> list[EpochResult]:
        """Train until ``config.max_epochs`` (continuing after :meth:`resume`).

        ``services`` run as workers for the duration: training starts once all
        of them have started (so no command or kernel reply published from
        then on is missed) and they are stopped afterwards; ``on_epoch`` (sync
        or async) sees each result.
        """
        if not self.services:
            await self._epochs(on_epoch)
            return self.history
        names = [f"{type(service).__name__}.{index}" for index, service in enumerate(self.services)]
        ctx = WorkerContext("tolaria.services")
        async with asyncio.TaskGroup() as group:
            services = group.create_task(
                run_children(ctx, {name: s.run for name, s in zip(names, self.services, strict=True)})
            )
            started = group.create_task(ctx.wait_started())
            await asyncio.wait({services, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if services.done():
                services.result()  # a service failed to start: raise its error
            try:
                await self._epochs(on_epoch)
            finally:
                ctx.stopping.set()
        return self.history

    async def _epochs(self, on_epoch: EpochCallback | None) -> None:
        while self.epoch < self.config.max_epochs:
            result = await self.run_epoch()
            if on_epoch is not None:
                outcome = on_epoch(result)
                if inspect.isawaitable(outcome):
                    await outcome

    async def run_epoch(self) -> EpochResult:
        epoch = self.epoch + 1
        self.manager.update_epoch(epoch)
        started = time.perf_counter()
        train = await self._train()
        validation = self.evaluate()
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.epoch = epoch
        seeds = self.seed_summaries()
        grafted = self._new_grafts(seeds)
        measures = EpochMeasures(train, validation, latency_ms, self.parameter_count())
        state = packets.state_packet(
            self.manager,
            measures,
            training_run_id=self.training_run_id,
            experiment_name=self.config.experiment_name,
            epoch=self.epoch,
            global_step=self.global_step,
            device=self.device,
        )
        telemetry = packets.telemetry_packet(
            measures, seeds, training_run_id=self.training_run_id, epoch=epoch
        )
        self.manager.build_telemetry()
        kasmina_packets = self.manager.drain_telemetry()
        checkpoint = await self.save_checkpoint() if self.config.checkpoint_dir is not None else None
        self._expect_answer(state.validation_loss)
        failures = await self._publish(state, telemetry, kasmina_packets)
        if self.config.command_wait_s > 0:
            await self.wait_for_commands(self.config.command_wait_s, self.config.commands_per_epoch)
        decision = self._take_answer()
        commands = self._commands[self._reported_commands :]
        self._reported_commands = len(self._commands)
        result = EpochResult(
            epoch=epoch,
            global_step=self.global_step,
            train_loss=train.loss,
            train_accuracy=train.accuracy,
            validation_loss=validation.loss,
            validation_accuracy=validation.accuracy,
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
            validation_metrics=dict(validation.metrics),
            parameters=measures.parameters,
            decision=decision,
        )
        self.history.append(result)
        _log.info(
            "tolaria.epoch",
            epoch=epoch,
            train_loss=round(train.loss, 5),
            validation_loss=round(validation.loss, 5),
            validation_accuracy=None if validation.accuracy is None else round(validation.accuracy, 5),
            validation_metrics={k: round(v, 5) for k, v in validation.metrics.items()},
            seeds=[f"{s.seed_id}:{s.stage}" for s in seeds],
            latency_ms=round(latency_ms, 2),
        )
        return result

    # -- reporting ---------------------------------------------------------------------

    def seed_summaries(self) -> list[SeedSummary]:
        return packets.seed_summaries(self.manager)

    def _new_grafts(self, seeds: list[SeedSummary]) -> list[str]:
        current = {(s.seed_id, s.blueprint_id) for s in seeds if s.stage_value in LIVE_STAGES}
        new = sorted(f"{seed}:{blueprint}" for seed, blueprint in current - self._known_grafts)
        self._known_grafts = current
        return new

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
