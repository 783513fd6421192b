"""Several message kinds share a stream: a consumer handles its own and acks the rest."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import Recorder, running

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient

STATE = pb.BUS_MESSAGE_TYPE_SYSTEM_STATE
COMMAND = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
REPORT = pb.BUS_MESSAGE_TYPE_FIELD_REPORT


async def test_ignored_types_are_acked_not_dead_lettered(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    recorder = Recorder(expected=1)
    acked: list[str] = []
    all_acked = asyncio.Event()

    def on_acked(ids: list[str]) -> None:
        acked.extend(ids)
        if len(acked) >= 3:
            all_acked.set()

    consumer = client.consumer(
        "oona.normal", recorder, types={STATE}, ignore_types={COMMAND, REPORT}, on_acked=on_acked
    )
    await client.publish_command(pb.AdaptationCommand(command_id="c"))
    await client.publish_field_report(pb.FieldReport(report_id="r"))
    await client.publish_state(pb.SystemStatePacket(packet_id="s"))
    async with running(consumer):
        await recorder.wait()
        await asyncio.wait_for(all_acked.wait(), 10)
    assert [m.decode(pb.SystemStatePacket).packet_id for m in recorder.messages] == ["s"]
    assert await redis_client.xlen("oona.deadletter") == 0
    pending = await redis_client.xpending("oona.normal", "test")
    assert pending["pending"] == 0
    snapshot = client.metrics_snapshot()
    assert snapshot["ignored.oona.normal"] == 2


async def test_types_outside_both_sets_are_still_unexpected(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    recorder = Recorder(expected=1)
    consumer = client.consumer("oona.normal", recorder, types={STATE}, ignore_types={REPORT})
    await client.publish_command(pb.AdaptationCommand(command_id="c"))
    await client.publish_state(pb.SystemStatePacket(packet_id="s"))
    async with running(consumer):
        await recorder.wait()
    reply = await redis_client.xread({"oona.deadletter": "0-0"}, block=2000)
    fields = reply[0][1][0][1]
    assert fields[b"reason"] == b"unexpected_type"
