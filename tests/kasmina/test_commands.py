from __future__ import annotations

from collections.abc import Callable

import pytest

from esper.kasmina import KasminaSeedManager
from esper.leyline import leyline_pb2 as L
from esper.security import KeyRing, sign_command

from .conftest import Clock, command, events_named, make_host


def _snapshot(manager: KasminaSeedManager) -> dict[str, tuple[int, str, float, bool, object]]:
    return {sid: (c.stage, c.blueprint_id, c.alpha, c.paused, c.kernel) for sid, c in manager.seeds.items()}


@pytest.fixture
async def live(
    make_manager: Callable[..., KasminaSeedManager], keys: KeyRing, clock: Clock
) -> KasminaSeedManager:
    manager = make_manager(blueprint_lookup=lambda bp: bp.startswith("BP"))
    manager.register_host_model(make_host())
    result = await manager.handle_command(command(keys, clock))
    assert result.applied, result
    return manager


async def test_signed_germinate_grafts(live: KasminaSeedManager) -> None:
    seed = live.get_seed("2")
    assert seed is not None
    assert seed.stage == L.SEED_STAGE_TRAINING
    assert seed.blueprint_id == "BP100"
    assert live.accepted_commands == 1
    assert live.drain_telemetry()  # a packet was emitted for the command


def _tampered(keys: KeyRing, clock: Clock) -> L.AdaptationCommand:
    cmd = command(keys, clock, operation=L.SEED_OP_CULL)
    cmd.target_seed_id = "3"
    return cmd


def _missing_id(keys: KeyRing, clock: Clock) -> L.AdaptationCommand:
    return command(keys, clock, operation=L.SEED_OP_CULL, command_id="")


def _missing_ts(keys: KeyRing, clock: Clock) -> L.AdaptationCommand:
    cmd = command(None, clock, operation=L.SEED_OP_CULL)
    cmd.ClearField("issued_at")
    sign_command(cmd, keys)
    return cmd


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda k, c: command(None, c, operation=L.SEED_OP_CULL), "missing_signature"),
        (_tampered, "invalid_signature"),
        (
            lambda k, c: command(KeyRing(b"another-secret-entirely-000000"), c, operation=L.SEED_OP_CULL),
            "invalid_signature",
        ),
        (_missing_id, "missing_command_id"),
        (_missing_ts, "missing_timestamp"),
        (lambda k, c: command(k, c, operation=L.SEED_OP_CULL, issued_at=c.time() - 61), "stale_command"),
        (lambda k, c: command(k, c, operation=L.SEED_OP_CULL, issued_at=c.time() + 6), "issued_in_future"),
        (lambda k, c: command(k, c, operation=L.SEED_OP_CULL, seed_id="nope"), "unknown_seed"),
        (lambda k, c: command(k, c, command_type=L.COMMAND_PAUSE, seed_id="nope"), "unknown_seed"),
        (lambda k, c: command(k, c, seed_id="2b", blueprint_id="XYZ"), "unknown_blueprint"),
        (lambda k, c: command(k, c, command_type=L.COMMAND_ROLLBACK), "unsupported_command"),
    ],
)
async def test_rejections_have_reasons_counters_and_no_effect(
    live: KasminaSeedManager,
    keys: KeyRing,
    clock: Clock,
    build: Callable[[KeyRing, Clock], L.AdaptationCommand],
    reason: str,
) -> None:
    before = _snapshot(live)
    cmd = build(keys, clock)
    result = await live.handle_command(cmd)
    assert (result.status, result.reason) == ("rejected", reason)
    assert live.rejections[reason] == 1
    assert events_named(live, "command_rejected")[-1]["reason"] == reason
    assert _snapshot(live) == before
    packet = live.telemetry_packets[-1]
    assert packet.system_health.indicators["priority"] == "HIGH"
    rejected = {
        m.attributes["reason"]: m.value for m in packet.metrics if m.name == "kasmina.commands.rejected_total"
    }
    assert rejected == {reason: 1.0}


async def test_replay_is_rejected(live: KasminaSeedManager, keys: KeyRing, clock: Clock) -> None:
    pause = command(keys, clock, command_type=L.COMMAND_PAUSE)
    assert (await live.handle_command(pause)).applied
    seed = live.get_seed("2")
    assert seed is not None
    assert seed.paused
    live.resume("2")
    again = await live.handle_command(pause)
    assert again.reason == "nonce_replayed"
    assert not seed.paused  # the replay changed nothing


async def test_freshness_is_checked_before_the_nonce(
    live: KasminaSeedManager, keys: KeyRing, clock: Clock
) -> None:
    stale = command(
        keys, clock, command_type=L.COMMAND_PAUSE, command_id="same-id", issued_at=clock.time() - 120
    )
    assert (await live.handle_command(stale)).reason == "stale_command"
    future = command(
        keys, clock, command_type=L.COMMAND_PAUSE, command_id="same-id", issued_at=clock.time() + 60
    )
    assert (await live.handle_command(future)).reason == "issued_in_future"
    # Neither rejected copy burned the id: the genuine, fresh command is still accepted ...
    fresh = command(keys, clock, command_type=L.COMMAND_PAUSE, command_id="same-id")
    assert (await live.handle_command(fresh)).applied
    # ... exactly once.
    assert (await live.handle_command(fresh)).reason == "nonce_replayed"


async def test_no_keys_rejects_everything(
    make_manager: Callable[..., KasminaSeedManager], keys: KeyRing, clock: Clock
) -> None:
    manager = make_manager(keys=None)
    result = await manager.handle_command(command(keys, clock))
    assert result.reason == "verifier_unavailable"
    assert manager.seeds == {}


async def test_other_training_run_is_ignored_not_rejected(
    live: KasminaSeedManager, keys: KeyRing, clock: Clock
) -> None:
    before = _snapshot(live)
    cmd = command(keys, clock, operation=L.SEED_OP_CULL, annotations={"training_run_id": "run-2"})
    result = await live.handle_command(cmd)
    assert result.status == "ignored"
    assert live.ignored_commands == 1
    assert sum(live.rejections.values()) == 0
    assert _snapshot(live) == before


async def test_dispatch_cull_pause_resume_breaker_emergency(
    live: KasminaSeedManager, keys: KeyRing, clock: Clock
) -> None:
    seed = live.get_seed("2")
    assert seed is not None
    assert (await live.handle_command(command(keys, clock, command_type=L.COMMAND_PAUSE))).applied
    assert seed.paused
    resume = command(keys, clock, command_type=L.COMMAND_PAUSE, annotations={"resume": "true"})
    assert (await live.handle_command(resume)).applied
    assert not seed.paused

    breaker = command(keys, clock, command_type=L.COMMAND_CIRCUIT_BREAKER)
    breaker.circuit_breaker.desired_state = L.CIRCUIT_STATE_OPEN
    sign_command(breaker, keys)
    assert (await live.handle_command(breaker)).applied
    assert live.breaker.state == L.CIRCUIT_STATE_OPEN

    emergency = command(keys, clock, command_type=L.COMMAND_EMERGENCY)
    assert (await live.handle_command(emergency)).applied
    assert len(live.kernel_cache) == 0
    assert live.telemetry_packets[-1].system_health.indicators["priority"] == "CRITICAL"

    optimizer = command(keys, clock, command_type=L.COMMAND_OPTIMIZER)
    assert (await live.handle_command(optimizer)).applied
    assert events_named(live, "optimizer_adjust")

    assert (await live.handle_command(command(keys, clock, operation=L.SEED_OP_CULL))).applied
    assert live.get_seed("2") is None
