"""Malformed and far-future policy versions over the bus: dead-lettered once with a reason, never retried."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from _loop_support import LIMIT_S, decoded, germinate_policy, read_stream, running

from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.security import KeyRing
from esper.tamiyo import TamiyoController, TamiyoPolicyRegistry, TamiyoService, encode_policy

L = leyline_pb2


def _update(label: str) -> L.PolicyUpdate:
    update = L.PolicyUpdate(
        version=1,
        policy_id="tamiyo-default",
        tamiyo_policy_version=label,
        payload=encode_policy(germinate_policy(seed=3), 1, "tamiyo-default"),
    )
    update.issued_at.GetCurrentTime()
    return update


async def test_bad_versions_are_dead_lettered_and_the_next_good_update_applies(
    make_client: Callable[..., OonaClient], keyring: KeyRing, tmp_path: Path, redis_client: aioredis.Redis
) -> None:
    registry = TamiyoPolicyRegistry(germinate_policy(), policy_dir=tmp_path / "policy")
    controller = TamiyoController(keyring, KarnCatalog(), registry=registry)
    tamiyo = make_client("tamiyo")
    service = TamiyoService(tamiyo, controller)
    publisher = make_client("simic")
    async with running(service):
        for label in ("²", "٣", "9" * 5000, "99999999999", "1"):
            assert (await publisher.publish_policy_update(_update(label))).ok
        accepted = await read_stream(
            redis_client, "oona.telemetry", lambda f: b"policy_update_accepted" in decoded(f)[1]
        )
        assert accepted
        letters: list[str] = []
        last = "0-0"
        async with asyncio.timeout(LIMIT_S):
            while len(letters) < 4:
                reply = await redis_client.xread({"oona.deadletter": last}, block=500)
                for _s, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id.decode()
                        letters.append(fields[b"reason"].decode())

    assert sorted(letters) == ["policy_malformed_version"] * 3 + ["policy_version_jump"]
    assert controller.policy_version == 1
    assert service.count("policy_updates_rejected.malformed_version") == 3
    assert service.count("policy_updates_rejected.version_jump") == 1
    assert service.count("policy_updates_accepted") == 1
    assert tamiyo.metrics_snapshot().get("retries.oona.policy", 0) == 0
    assert (await redis_client.xpending("oona.policy", "tamiyo-policy.tamiyo-1"))["pending"] == 0
