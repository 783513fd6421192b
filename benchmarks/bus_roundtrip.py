"""Raw Redis Streams versus Oona's signed, verified bus on one private server, in the same run.

Raw: XADD → XREADGROUP → XACK. Oona: publish (envelope, HMAC, XADD) → subscription (XREADGROUP,
verification, the replay-key read, the handler) → commit (replay claim + XACK in one script).
Both use identically configured redis-py clients (Oona's connection factory) and the same batch
size and block time. A round trip is timed from the publish call until the consumer's ack has
returned (raw: XACK; Oona: the commit, reported by ``on_committed``).

The two alternate for BENCH_ROUNDS rounds (default 3) on a flushed server, and the ratios are the
medians of each round's ratio, so a slow spell of a shared machine lands on both sides.

Run: .venv/bin/python benchmarks/bus_roundtrip.py   (last line is JSON; BENCH_N messages, default 5000)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio as aioredis

from esper.core.redis_server import RedisServer, ServerOptions
from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import DeliveryPolicy, OonaClient, OonaMessage, StreamConfig
from esper.oona.connection import connect
from esper.security.signing import KeyRing

N = int(os.environ.get("BENCH_N", "5000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
BATCH = 100
IN_FLIGHT = 48
BLOCK_MS = 200
BODY = pb.AdaptationCommand(command_id="x" * 260).SerializeToString()  # ~300 bytes on the wire
CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
GROUP = "bench"
SECRET = b"benchmark-secret-0123456789abcdef"


def _config(instance: str) -> StreamConfig:
    return StreamConfig(
        instance=instance,
        block_ms=BLOCK_MS,
        max_stream_length=None,
        hard_cap=None,
        delivery=DeliveryPolicy(batch=BATCH),
    )


async def _raw_consumer(
    redis: aioredis.Redis, stream: str, on_message: Callable[[], None], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        reply = await redis.xreadgroup(GROUP, "raw-0", {stream: ">"}, count=BATCH, block=BLOCK_MS)
        for _stream, entries in reply or []:
            ids = []
            for entry_id, fields in entries:
                _ = fields[b"payload"]
                ids.append(entry_id)
            await redis.xack(stream, GROUP, *ids)
            for _ in ids:
                on_message()


async def _drive(
    publish: Callable[[int], Awaitable[object]], arrived: asyncio.Queue[float]
) -> tuple[float, float]:
    """(p50 one-at-a-time latency in ms, throughput msgs/s with IN_FLIGHT publishers)."""
    latencies = []
    for i in range(N):
        start = time.perf_counter()
        await publish(i)
        await arrived.get()
        latencies.append((time.perf_counter() - start) * 1000)
    limit = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        async with limit:
            await publish(i)

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for i in range(N):
            group.create_task(one(i))
    for _ in range(N):
        await arrived.get()
    return statistics.median(latencies), N / (time.perf_counter() - start)


async def bench_raw(url: str) -> tuple[float, float]:
    stream = "raw.bench"
    pub, sub = connect(url, _config("raw-pub")), connect(url, _config("raw-0"))
    await pub.xgroup_create(stream, GROUP, id="0", mkstream=True)
    arrived: asyncio.Queue[float] = asyncio.Queue()
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(_raw_consumer(sub, stream, lambda: arrived.put_nowait(time.perf_counter()), stop))

        async def publish(i: int) -> None:
            await pub.xadd(stream, {b"payload": BODY})

        result = await _drive(publish, arrived)
        stop.set()
    await pub.aclose()
    await sub.aclose()
    return result


async def bench_oona(url: str) -> tuple[float, float]:
    ring = KeyRing(SECRET)
    pub, sub = OonaClient(url, _config("oona-pub"), ring), OonaClient(url, _config("oona-0"), ring)
    arrived: asyncio.Queue[float] = asyncio.Queue()

    async def handler(message: OonaMessage) -> None:
        _ = message.payload

    def committed(ids: list[str]) -> None:
        for _ in ids:
            arrived.put_nowait(time.perf_counter())

    subscription = sub.subscribe("oona.normal", GROUP, handler, types={CMD}, on_committed=committed)
    async with running(subscription.run, "bench"):

        async def publish(i: int) -> None:
            result = await pub.publish(CMD, BODY)
            assert result.ok, result

        result = await _drive(publish, arrived)
    snap = sub.metrics_snapshot()
    assert snap.get("consumed.oona.normal") == 2 * N, snap
    await pub.aclose()
    await sub.aclose()
    return result


async def main() -> None:
    rounds: list[tuple[float, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(ServerOptions(data_dir=Path(tmp)))
        server.start()
        admin = connect(server.url, _config("bench-admin"))
        try:
            print(
                f"server on port {server.port}; {N} messages of ~{len(BODY)} bytes, {ROUNDS} rounds",
                flush=True,
            )
            for number in range(1, ROUNDS + 1):
                await admin.flushall()
                raw_p50, raw_rate = await bench_raw(server.url)
                await admin.flushall()
                oona_p50, oona_rate = await bench_oona(server.url)
                print(
                    f"round {number}: raw p50 {raw_p50:.3f} ms, {raw_rate:,.0f} msgs/s; "
                    f"oona p50 {oona_p50:.3f} ms, {oona_rate:,.0f} msgs/s",
                    flush=True,
                )
                rounds.append((raw_p50, oona_p50, raw_rate, oona_rate))
        finally:
            await admin.aclose()
            server.stop()

    def median(column: int) -> float:
        return statistics.median(r[column] for r in rounds)

    print(
        json.dumps(
            {
                "raw_p50_ms": round(median(0), 4),
                "oona_p50_ms": round(median(1), 4),
                "p50_ratio": round(statistics.median(r[1] / r[0] for r in rounds), 3),
                "raw_msgs_per_s": round(median(2), 1),
                "oona_msgs_per_s": round(median(3), 1),
                "throughput_ratio": round(statistics.median(r[3] / r[2] for r in rounds), 3),
                "rounds": ROUNDS,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
