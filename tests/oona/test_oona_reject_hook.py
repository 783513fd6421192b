"""RejectMessage: a handler refuses a message; it is dead-lettered at once, never retried."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import dead_letters, running

from esper.leyline import leyline_pb2
from esper.oona import OonaClient, OonaMessage, RejectMessage

POLICY = leyline_pb2.BUS_MESSAGE_TYPE_POLICY_UPDATE


async def test_group_handler_rejection_dead_letters_once_with_reason(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(retry_max_attempts=5)
    calls: list[OonaMessage] = []
    handled = asyncio.Event()

    async def handler(message: OonaMessage) -> None:
        calls.append(message)
        update = message.decode(leyline_pb2.PolicyUpdate)
        if update.policy_id == "bad":
            raise RejectMessage("policy_stale_version", "version 1 <= current 3")
        handled.set()

    consumer = client.consumer("oona.policy", handler, types={POLICY})
    async with running(consumer):
        assert await client.publish_policy_update(leyline_pb2.PolicyUpdate(policy_id="bad", version=1))
        letters = await dead_letters(redis_client, 1)
        assert await client.publish_policy_update(leyline_pb2.PolicyUpdate(policy_id="good", version=4))
        await asyncio.wait_for(handled.wait(), 5)
    assert letters[0][b"reason"] == b"policy_stale_version"
    assert letters[0][b"detail"] == b"version 1 <= current 3"
    assert letters[0][b"source_stream"] == b"oona.policy"
    # Exactly one delivery of the rejected entry (no retry), then the good one.
    assert [m.decode(leyline_pb2.PolicyUpdate).policy_id for m in calls] == ["bad", "good"]
    snap = client.metrics_snapshot()
    assert snap["deadletter.policy_stale_version"] == 1
    assert snap["rejected.oona.policy.policy_stale_version"] == 1
    assert snap.get("retries.oona.policy", 0) == 0
    pending = await redis_client.xpending("oona.policy", "test")
    assert pending["pending"] == 0


async def test_bad_reason_tokens_are_normalised(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()

    async def handler(message: OonaMessage) -> None:
        raise RejectMessage("Not A Token\nwith newline")

    consumer = client.consumer("oona.policy", handler, types={POLICY})
    async with running(consumer):
        assert await client.publish_policy_update(leyline_pb2.PolicyUpdate(version=1))
        letters = await dead_letters(redis_client, 1)
    assert letters[0][b"reason"] == b"handler_rejected"


async def test_broadcast_handler_rejection_is_counted(make_client: Callable[..., OonaClient]) -> None:
    client = make_client()
    seen = asyncio.Event()

    async def handler(message: OonaMessage) -> None:
        seen.set()
        raise RejectMessage("not_mine")

    reader = client.broadcast("oona.policy", handler, types={POLICY})
    async with running(reader):
        await asyncio.wait_for(reader.ready.wait(), 5)
        assert await client.publish_policy_update(leyline_pb2.PolicyUpdate(version=1))
        await asyncio.wait_for(seen.wait(), 5)
    assert client.metrics_snapshot()["rejected.oona.policy.not_mine"] == 1
