"""Tamiyo replicas share each run's history: three replicas decide exactly as one does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from _loop_support import LIMIT_S, RUN, decoded, germinate_policy, running, system_state

from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo import TamiyoController, TamiyoPolicyRegistry, TamiyoService, encode_policy

L = leyline_pb2
# Validation loss per epoch: a fall, a rise, a spike (> 0.15), recovery.
LOSSES = [1.0, 0.9, 0.95, 1.3, 0.8, 0.7, 0.75, 0.6]


def seeds_for(epoch: int) -> list[L.SeedState]:
    """What the trainer reports: a seed grafted after epoch 1, training, then fossilized."""
    if epoch == 1:
        return []
    stage = L.SEED_STAGE_TRAINING if epoch < 6 else L.SEED_STAGE_FOSSILIZED
    return [L.SeedState(seed_id="seed-1", stage=stage)]


async def decision_for(redis: aioredis.Redis, packet_id: str, cursors: dict[str, str]) -> tuple[Any, ...]:
    """Block (XREAD, no polling) until the decision telemetry of ``packet_id`` appears; its summary."""
    async with asyncio.timeout(LIMIT_S):
        while True:
            reply = await redis.xread(dict(cursors), block=500)
            for stream, entries in reply or []:
                for entry_id, fields in entries:
                    cursors[stream.decode()] = entry_id.decode()
                    kind, payload = decoded(fields)
                    if kind != L.BUS_MESSAGE_TYPE_TELEMETRY:
                        continue
                    packet = L.TelemetryPacket.FromString(payload)
                    indicators = packet.system_health.indicators
                    if indicators.get("packet_id") == packet_id:
                        delta = next(m.value for m in packet.metrics if m.name == "tamiyo.loss_delta")
                        return (
                            indicators["action"],
                            packet.system_health.summary,
                            packet.system_health.status,
                            round(delta, 4),
                        )


async def drive(
    make_client: Callable[..., OonaClient],
    keyring: KeyRing,
    tmp_path: Path,
    redis: aioredis.Redis,
    replicas: int,
    run_id: str,
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[int]]:
    """Publish the packet sequence to ``replicas`` services, each packet after the previous decision."""
    services = [
        TamiyoService(
            make_client("tamiyo", consumer=f"tamiyo-{replicas}-{i}"),
            TamiyoController(
                keyring,
                KarnCatalog(),
                registry=TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path / f"p{replicas}-{i}"),
            ),
        )
        for i in range(replicas)
    ]
    trainer = make_client("trainer", consumer=f"trainer-{replicas}")
    cursors = {"oona.telemetry": "$", "oona.emergency": "$"}
    for stream in cursors:
        info = await redis.xinfo_stream(stream) if await redis.exists(stream) else {}
        last = info.get("last-generated-id", b"0-0") if info else b"0-0"
        cursors[stream] = last.decode() if isinstance(last, bytes) else str(last)
    decisions = []
    async with running(*services):
        for epoch, loss in enumerate(LOSSES, start=1):
            state = system_state(run_id, epoch, loss, seeds_for(epoch))
            assert (await trainer.publish_state(state)).ok
            decisions.append(await decision_for(redis, state.packet_id, cursors))
    effects = []
    for _id, fields in await redis.xrange("oona.normal"):
        kind, payload = decoded(fields)
        if kind == L.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND:
            command = L.AdaptationCommand.FromString(payload)
            if command.annotations.get("training_run_id") == run_id:
                effects.append(
                    (
                        "command",
                        command.command_type,
                        command.target_seed_id,
                        command.annotations.get("risk_reason", ""),
                    )
                )
        elif kind == L.BUS_MESSAGE_TYPE_FIELD_REPORT:
            report = L.FieldReport.FromString(payload)
            if report.training_run_id == run_id:
                effects.append(("report", report.outcome))
    return decisions, effects, [s.count("states_evaluated") for s in services]


async def test_three_replicas_decide_exactly_as_one(
    make_client: Callable[..., OonaClient], keyring: KeyRing, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    alone, alone_effects, _ = await drive(make_client, keyring, tmp_path, redis_client, 1, f"{RUN}-alone")
    shared, shared_effects, split = await drive(
        make_client, keyring, tmp_path, redis_client, 3, f"{RUN}-shared"
    )
    assert shared == alone
    assert shared_effects == alone_effects
    # The work really was split: the history crossed replicas.
    assert sum(split) == len(LOSSES)
    assert sum(1 for n in split if n) >= 2, split
    # The sequence exercised the history: a spike pause and field reports of earlier commands.
    assert any("loss_spike" in summary for _a, summary, _s, _d in alone)
    assert any(effect[0] == "report" for effect in alone_effects)


async def accepted_updates(redis: aioredis.Redis, count: int) -> list[str]:
    """Block until ``count`` policy_update_accepted telemetry packets exist; the sources' instances."""
    seen: list[str] = []
    last = "0-0"
    async with asyncio.timeout(LIMIT_S):
        while len(seen) < count:
            for _s, entries in await redis.xread({"oona.telemetry": last}, block=500) or []:
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    kind, payload = decoded(fields)
                    if kind == L.BUS_MESSAGE_TYPE_TELEMETRY:
                        packet = L.TelemetryPacket.FromString(payload)
                        if any(e.description == "policy_update_accepted" for e in packet.events):
                            seen.append(packet.packet_id)
    return seen


async def test_every_replica_applies_a_policy_update_and_a_late_one_catches_up(
    make_client: Callable[..., OonaClient], keyring: KeyRing, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    def replica(name: str) -> TamiyoService:
        registry = TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path / name)
        return TamiyoService(
            make_client("tamiyo", consumer=name), TamiyoController(keyring, KarnCatalog(), registry=registry)
        )

    first, second = replica("tamiyo-a"), replica("tamiyo-b")
    update = L.PolicyUpdate(
        version=1,
        policy_id="tamiyo-default",
        tamiyo_policy_version="7",
        payload=encode_policy(germinate_policy(seed=3), 7, "tamiyo-default"),
    )
    update.issued_at.GetCurrentTime()
    async with running(first, second):
        assert (await make_client("simic").publish_policy_update(update)).ok
        await accepted_updates(redis_client, 2)
    assert first.controller.policy_version == second.controller.policy_version == 7
    # A replica that was away (fresh policy dir, started after the update) runs the newest one.
    late = replica("tamiyo-c")
    assert late.controller.policy_version == 0
    async with running(late):
        assert late.controller.policy_version == 7
        assert late.count("policy_caught_up") == 1
