"""Helpers shared by the integration tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import torch
from torch import nn

from esper.core.worker import running as run_worker
from esper.kasmina import AlphaSchedule, KasminaPrefetchCoordinator, KasminaSeedManager, SeedSlot
from esper.leyline import leyline_pb2
from esper.oona import OonaMessage
from esper.security import KeyRing, sign_command
from esper.tamiyo import PolicyConfig, TamiyoPolicy
from esper.urza import UrzaLibrary, UrzaRuntime

L = leyline_pb2
D = 16
RUN = "run-integration"
SECRET = b"integration-secret-0123456789abcdef"
LIMIT_S = 10.0
FORGED = ("BP001", "BP002", "BP009")


def host_model(*slots: str) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, D), nn.ReLU()]
    layers += [SeedSlot(nn.Linear(D, D), D, name=name) for name in slots]
    layers.append(nn.Linear(D, 2))
    return nn.Sequential(*layers)


def make_manager(
    library: UrzaLibrary, model: nn.Module, keyring: KeyRing, **overrides: Any
) -> KasminaSeedManager:
    options: dict[str, Any] = {
        "runtime": UrzaRuntime(library),  # fallback blueprint (BP001) comes from the local library
        "keys": keyring,
        "training_run_id": RUN,
        "training_steps": 2,
        "shadowing_steps": 2,
        "alpha_schedule": AlphaSchedule(total_steps=6, temperature=1.0),
        "prefetch_timeout_seconds": 3.0,
    }
    options.update(overrides)
    manager = KasminaSeedManager(**options)
    manager.register_host_model(model)
    return manager


class ObservedCoordinator(KasminaPrefetchCoordinator):
    """The real coordinator, plus an event set after every reply handled and every expiry tick."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = asyncio.Event()

    async def handle_ready(self, message: OonaMessage) -> None:
        await super().handle_ready(message)
        self.changed.set()

    async def handle_error(self, message: OonaMessage) -> None:
        await super().handle_error(message)
        self.changed.set()

    async def tick(self) -> int:
        expired = await super().tick()
        self.changed.set()
        return expired

    async def until(self, predicate: Callable[[], bool], limit_s: float = LIMIT_S) -> None:
        async with asyncio.timeout(limit_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def running(*workers: Any) -> AsyncIterator[None]:
    """Run workers (``run(ctx)``) until the body ends; the body starts once all have started."""
    async with contextlib.AsyncExitStack() as stack:
        for index, worker in enumerate(workers):
            await stack.enter_async_context(run_worker(worker.run, f"{type(worker).__name__}.{index}"))
        yield


def germinate_command(
    keyring: KeyRing | None,
    seed_id: str,
    blueprint_id: str = "BP009",
    *,
    issued_at: float | None = None,
) -> L.AdaptationCommand:
    command = L.AdaptationCommand(
        version=1,
        command_id=uuid.uuid4().hex,
        command_type=L.COMMAND_SEED,
        target_seed_id=seed_id,
        issued_by="test",
    )
    command.seed_operation.operation = L.SEED_OP_GERMINATE
    command.seed_operation.blueprint_id = blueprint_id
    command.annotations["training_run_id"] = RUN
    command.issued_at.FromNanoseconds(int((time.time() if issued_at is None else issued_at) * 1e9))
    if keyring is not None:
        sign_command(command, keyring)
    return command


def events(manager: KasminaSeedManager, name: str) -> list[dict[str, str]]:
    """Every event ``name`` the manager emitted (queued or already in telemetry packets)."""
    found = [dict(e.attributes) for e in manager.pending_events if e.description == name]
    for packet in manager.telemetry_packets:
        found += [dict(e.attributes) for e in packet.events if e.description == name]
    return found


def germinate_policy(*, seed: int = 0) -> TamiyoPolicy:
    """A real policy mildly preferring GERMINATE of BP009 (Simic can talk it out of it)."""
    base = TamiyoPolicy(PolicyConfig(seed=seed))
    weights = dict(base.weights)
    weights["action_head.weight"] = np.zeros_like(weights["action_head.weight"])
    weights["action_head.bias"] = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)
    weights["blueprint_head.weight"] = np.zeros_like(weights["blueprint_head.weight"])
    blueprint_bias = np.full_like(weights["blueprint_head.bias"], -1.0)
    blueprint_bias[base.blueprint_candidates.index("BP009")] = 1.0
    weights["blueprint_head.bias"] = blueprint_bias
    return TamiyoPolicy(base.config, weights)


def system_state(
    run_id: str, epoch: int, loss: float, seeds: list[L.SeedState] | None = None
) -> L.SystemStatePacket:
    state = L.SystemStatePacket(
        version=1,
        current_epoch=epoch,
        validation_loss=loss,
        validation_accuracy=0.5,
        training_loss=loss,
        training_run_id=run_id,
        packet_id=f"{run_id}-{epoch}-{uuid.uuid4().hex[:6]}",
        source_subsystem="tolaria",
        timestamp_ns=time.time_ns(),
    )
    state.seed_states.extend(seeds or [])
    return state


async def read_stream(
    redis: aioredis.Redis,
    stream: str,
    predicate: Callable[[dict[bytes, bytes]], bool],
    *,
    start: str = "0-0",
    limit_s: float = LIMIT_S,
) -> dict[bytes, bytes]:
    """Blocking XREAD (no polling) until an entry matches."""
    last = start
    async with asyncio.timeout(limit_s):
        while True:
            reply = await redis.xread({stream: last}, block=500)
            for _s, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    if predicate(fields):
                        return dict(fields)


def decoded(fields: dict[bytes, bytes]) -> tuple[int, bytes]:
    envelope = L.BusEnvelope()
    envelope.ParseFromString(fields[b"payload"])
    return envelope.message_type, envelope.payload


def decision_telemetry_for(run_id: str) -> Callable[[dict[bytes, bytes]], bool]:
    def match(fields: dict[bytes, bytes]) -> bool:
        kind, payload = decoded(fields)
        if kind != L.BUS_MESSAGE_TYPE_TELEMETRY:
            return False
        packet = L.TelemetryPacket()
        packet.ParseFromString(payload)
        return packet.system_health.indicators.get("training_run_id") == run_id

    return match


def telemetry_action(fields: dict[bytes, bytes]) -> str:
    packet = L.TelemetryPacket()
    packet.ParseFromString(decoded(fields)[1])
    return packet.system_health.indicators["action"]
