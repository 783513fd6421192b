"""Shared fixtures: a fake clock pair, keys, a tiny host with a slot, an in-process runtime."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from esper.kasmina import KasminaSeedManager, add_seed_slots
from esper.leyline import leyline_pb2
from esper.security import KeyRing, sign_command

DIM = 8
RUN = "run-1"


class Clock:
    """Monotonic and wall clocks that only move when told to."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class Runtime:
    """An in-process blueprint runtime building real torch kernels."""

    def __init__(self, latency_ms: float = 1.0) -> None:
        self.latency_ms = latency_ms
        self.fail: set[str] = set()
        self.calls: list[str] = []

    def fetch_kernel(self, blueprint_id: str) -> tuple[nn.Module, float]:
        self.calls.append(blueprint_id)
        if blueprint_id in self.fail:
            raise RuntimeError(f"cannot build {blueprint_id}")
        torch.manual_seed(len(self.calls))
        module = nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh(), nn.Linear(DIM, DIM))
        module.blueprint_id = blueprint_id  # type: ignore[assignment]
        return module, self.latency_ms


def make_host() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, DIM), nn.ReLU(), nn.Linear(DIM, DIM), nn.Linear(DIM, 2))
    add_seed_slots(model, {"2": DIM})
    return model


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing(b"kasmina-test-secret-0123456789abcdef")


@pytest.fixture
def runtime() -> Runtime:
    return Runtime()


@pytest.fixture
def make_manager(clock: Clock, keys: KeyRing, runtime: Runtime) -> Callable[..., KasminaSeedManager]:
    def build(**overrides: object) -> KasminaSeedManager:
        options: dict[str, object] = {
            "runtime": runtime,
            "keys": keys,
            "training_run_id": RUN,
            "clock": clock.monotonic,
            "wall_clock": clock.time,
            "training_steps": 2,
            "shadowing_steps": 2,
        }
        options.update(overrides)
        return KasminaSeedManager(**options)  # type: ignore[arg-type]

    return build


_ids = itertools.count(1)


def command(
    keys: KeyRing | None,
    clock: Clock,
    *,
    command_type: int = leyline_pb2.COMMAND_SEED,
    operation: int = leyline_pb2.SEED_OP_GERMINATE,
    seed_id: str = "2",
    blueprint_id: str = "BP100",
    command_id: str | None = None,
    issued_at: float | None = None,
    annotations: dict[str, str] | None = None,
) -> leyline_pb2.AdaptationCommand:
    cmd = leyline_pb2.AdaptationCommand(
        version=1,
        command_id=f"cmd-{next(_ids)}" if command_id is None else command_id,
        command_type=command_type,  # type: ignore[arg-type]
        target_seed_id=seed_id,
        issued_by="tamiyo",
    )
    if command_type == leyline_pb2.COMMAND_SEED:
        cmd.seed_operation.operation = operation  # type: ignore[assignment]
        cmd.seed_operation.blueprint_id = blueprint_id
    cmd.issued_at.FromNanoseconds(int((clock.time() if issued_at is None else issued_at) * 1e9))
    cmd.annotations.update(annotations or {"training_run_id": RUN})
    if keys is not None:
        sign_command(cmd, keys)
    return cmd


def event_names(manager: KasminaSeedManager) -> list[str]:
    names = [e.description for e in manager.pending_events]
    for packet in manager.telemetry_packets:
        names.extend(e.description for e in packet.events)
    return names


def events_named(manager: KasminaSeedManager, name: str) -> list[dict[str, str]]:
    found = [dict(e.attributes) for e in manager.pending_events if e.description == name]
    for packet in manager.telemetry_packets:
        found.extend(dict(e.attributes) for e in packet.events if e.description == name)
    return found
