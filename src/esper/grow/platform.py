"""``Platform``: a connected platform, which grows models.

Everything the demo used to wire by hand lives here once: the kernels
forged for the slots' width and announced on the bus, a Kasmina seed
manager with the bus kernel coordinator and command intake, a reader of the
controller's decisions, and Tolaria's loop with the caller's loss, data and
metrics. Each bus component gets its own client named after the run, and
all of them run as workers for the duration of :meth:`Platform.train`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from esper.core.logs import get_logger
from esper.core.redact import mask_url
from esper.core.settings import EsperSettings
from esper.grow import slots as seed_slots
from esper.grow.errors import PlatformUnavailable
from esper.grow.outcome import GrowthRun
from esper.grow.probe import ask_for_kernel
from esper.kasmina import KasminaCommandIntake, KasminaPrefetchCoordinator, KasminaSeedManager
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo.policy import DEFAULT_BLUEPRINT_CANDIDATES
from esper.tezzeret import ForgeReport, run_forge
from esper.tezzeret.forge import ProgressCallback
from esper.tolaria import (
    ControllerDecision,
    DecisionReader,
    EpochCallback,
    LossFn,
    MetricFn,
    Service,
    TolariaTrainer,
    TrainingConfig,
    resolve_device,
)
from esper.urza import UrzaLibrary, UrzaRuntime

_log = get_logger("esper.grow")
M = TypeVar("M", bound=nn.Module)
#: The kernels a model may be grown with: the controller's candidates and Kasmina's fallback.
KERNELS: tuple[str, ...] = tuple(sorted({"BP001", *DEFAULT_BLUEPRINT_CANDIDATES}))


class Platform:
    """A running platform, reached through :func:`esper.grow.connect`."""

    def __init__(
        self, settings: EsperSettings, url: str, client: OonaClient, *, timeout_s: float = 10.0
    ) -> None:
        self.settings = settings
        self._url = url
        self._client = client
        self._timeout_s = timeout_s
        self._ready_width: int | None = None

    @property
    def bus(self) -> str:
        """The bus URL, password masked (safe to print)."""
        return mask_url(self._url)

    def add_seeds(self, model: M, slots: Mapping[str, int]) -> M:
        """Put seed slots into ``model`` at the named layers (``{"encoder.2": 64}``); returns ``model``.

        Names are as in ``model.named_modules()``; ``d`` is the size of that
        layer's output's last dimension, the same for every slot. Raises
        :class:`~esper.grow.SeedSlotError` for an unknown layer or a wrong width.
        """
        return seed_slots.add_seeds(model, slots)

    async def prepare(self, width: int, *, progress: ProgressCallback | None = None) -> ForgeReport:
        """Forge the kernels for slots of ``width`` (skipping those already forged) and check that
        the platform serves them from the library this process loads them from.

        :meth:`train` calls it; call it yourself to see the forge's progress.
        """
        client = self._client

        async def announce(update: leyline_pb2.KernelCatalogUpdate) -> None:
            result = await client.publish_kernel_catalog_update(update)
            if not result.ok:
                raise RuntimeError(f"catalog update not published: {result.reason}")

        report = await run_forge(self.settings, width, KERNELS, announce, progress)
        _log.info(
            "grow.kernels_ready", width=width, compiled=len(report.compiled), skipped=len(report.skipped)
        )
        if self._ready_width != width:
            await self._check_same_library(KERNELS[-1])
            self._ready_width = width
        return report

    async def _check_same_library(self, blueprint_id: str) -> None:
        answer = await ask_for_kernel(self._client, blueprint_id, timeout_s=self._timeout_s)
        library = await asyncio.to_thread(UrzaLibrary.from_settings, self.settings)
        try:
            record = await asyncio.to_thread(library.get, blueprint_id)
        finally:
            library.close()
        if isinstance(answer, str):
            raise PlatformUnavailable(
                f"the platform stopped answering kernel requests on {self.bus}: {answer}"
            )
        if (
            isinstance(answer, leyline_pb2.KernelArtifactError)
            or record is None
            or answer.checksum != record.checksum
        ):
            why = (
                answer.reason
                if isinstance(answer, leyline_pb2.KernelArtifactError)
                else "a different artifact"
            )
            raise PlatformUnavailable(
                f"the platform serves {blueprint_id} from another kernel library ({why}): run where the "
                "platform runs, or set URZA_DATABASE_URL and URZA_ARTIFACT_DIR to the platform's"
            )

    async def train(
        self,
        model: nn.Module,
        train: Iterable[Any],
        validation: Iterable[Any],
        *,
        loss: LossFn,
        epochs: int,
        metrics: Mapping[str, MetricFn] | None = None,
        lr: float = 1e-3,
        seed_lr: float | None = None,
        device: str = "auto",
        on_epoch: EpochCallback | None = None,
        command_wait_s: float = 5.0,
        checkpoint_dir: Path | None = None,
        run_id: str | None = None,
    ) -> GrowthRun:
        """Train ``model`` (with seed slots) for ``epochs`` while the platform grows it.

        ``train`` and ``validation`` yield ``(inputs, targets)`` batches (e.g.
        ``DataLoader``\\ s); ``loss(outputs, targets)`` is the batch mean;
        ``metrics`` are extra held-out measures (``{"mae": fn}``). After each
        epoch the held-out numbers are reported to the controller, whose
        command (a graft, say) is applied before the next epoch; ``on_epoch``
        sees each :class:`~esper.tolaria.EpochResult`. ``device`` ``"auto"``
        is CUDA when present. ``seed_lr`` defaults to ``lr``.
        """
        if epochs < 1:
            raise ValueError("epochs must be at least 1")
        seed_slots.check_reiterable("train", train)
        seed_slots.check_reiterable("validation", validation)
        width = seed_slots.slot_width(model)
        first = next(iter(validation), None)
        if first is None:
            raise ValueError("the validation data has no batches")
        target = resolve_device(device)
        seed_slots.check_slot_outputs(model.to(target), first, target)
        await self.prepare(width)
        run_id = run_id or f"grow-{uuid.uuid4().hex[:8]}"
        settings = self.settings
        library = await asyncio.to_thread(UrzaLibrary.from_settings, settings)
        runtime = UrzaRuntime(library)
        manager = KasminaSeedManager(
            runtime=runtime, keys=KeyRing(*settings.signing_secrets()), training_run_id=run_id
        )
        manager.register_host_model(model)
        roles = ("tolaria", "prefetch", "intake", "decisions")
        clients = {
            role: OonaClient.from_settings(
                settings, instance=f"{run_id}-{role}", redis_url=self._url, name=role
            )
            for role in roles
        }
        trainer: TolariaTrainer | None = None

        def on_command(command: leyline_pb2.AdaptationCommand, result: Any) -> None:
            if trainer is not None:
                trainer.notify_command(command, result)

        def on_decision(decision: ControllerDecision) -> None:
            if trainer is not None:
                trainer.notify_decision(decision)

        def on_kernel(seed_id: str) -> None:
            if trainer is not None:
                trainer.notify_kernel(seed_id)

        services: list[Service] = [
            KasminaPrefetchCoordinator(
                clients["prefetch"], manager, runtime, training_run_id=run_id, on_kernel=on_kernel
            ),
            KasminaCommandIntake(clients["intake"], manager, on_result=on_command),
            DecisionReader(clients["decisions"], run_id, on_decision),
        ]
        config = TrainingConfig(
            max_epochs=epochs,
            lr=lr,
            seed_lr=seed_lr if seed_lr is not None else lr,
            device=device,
            checkpoint_dir=checkpoint_dir,
            experiment_name="esper-grow",
            command_wait_s=command_wait_s,
        )
        trainer = TolariaTrainer(
            model,
            manager,
            train,
            validation,
            client=clients["tolaria"],
            training_run_id=run_id,
            config=config,
            loss=loss,
            metrics=metrics,
            services=services,
        )
        started = time.monotonic()
        try:
            results = await trainer.run(on_epoch=on_epoch)
        finally:
            for client in clients.values():
                await client.aclose()
            library.close()
        failures = {
            seed_id: ctx.last_failure or ctx.fallback_reason
            for seed_id, ctx in manager.seeds.items()
            if ctx.last_failure or ctx.used_fallback
        }
        return GrowthRun(run_id, results, time.monotonic() - started, command_wait_s, failures)
