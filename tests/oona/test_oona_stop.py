"""Stopping an idle consumer does not wait for its blocking read; nothing read is lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import Recorder

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient

CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND


async def test_idle_consumer_stops_without_waiting_for_the_block_time(
    make_client: Callable[..., OonaClient],
) -> None:
    client = make_client(block_ms=30_000)
    await client.ensure_consumer_groups()
    recorder = Recorder()
    for consumer in (
        client.consumer("oona.normal", recorder, types={CMD}),
        client.broadcast("oona.normal", recorder, types={CMD}),
    ):
        task = asyncio.create_task(consumer.run())
        await asyncio.sleep(0.2)  # let it settle into its blocking read
        assert consumer.iterations >= 1
        # Far below the 30 s block: the read is abandoned, not waited out.
        await asyncio.wait_for(consumer.stop(), 5)
        await asyncio.wait_for(task, 5)


async def test_messages_after_a_stop_are_delivered_to_the_next_consumer(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(block_ms=30_000)
    await client.ensure_consumer_groups()
    first = client.consumer("oona.normal", Recorder(), types={CMD})
    task = asyncio.create_task(first.run())
    await asyncio.sleep(0.1)
    await asyncio.wait_for(first.stop(), 5)
    await task
    await client.publish_command(pb.AdaptationCommand(command_id="after-stop"))
    recorder = Recorder()
    second = client.consumer("oona.normal", recorder, types={CMD})
    task = asyncio.create_task(second.run())
    await recorder.wait()
    await second.stop()
    await task
    assert recorder.messages[0].decode(pb.AdaptationCommand).command_id == "after-stop"
    assert (await redis_client.xpending("oona.normal", "test"))["pending"] == 0


async def test_consumer_waiting_out_an_outage_stops_at_once(make_client: Callable[..., OonaClient]) -> None:
    from esper.core.redis_server import free_port

    client = make_client(
        f"redis://127.0.0.1:{free_port()}/0",
        breaker_failure_threshold=1,
        consume_breaker_timeout_ms=60_000,
        reconnect_base_ms=30_000,
        reconnect_max_ms=60_000,
    )
    consumer = client.consumer("oona.normal", Recorder(), types={CMD})
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.3)  # the first read fails: now backing off / breaker open for a minute
    assert consumer.reconnects >= 1
    await asyncio.wait_for(consumer.stop(), 5)
    await asyncio.wait_for(task, 5)
