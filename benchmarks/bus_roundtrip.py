"""Raw Redis Streams versus Oona's signed, verified bus on one private server, in the same run.

Raw: XADD → XREADGROUP → XACK. Oona: publish (envelope, HMAC, XADD) → subscription (XREADGROUP,
verification, the handler under its deadline) → commit (replies, replay claim and XACK in one
script). Both use identically configured redis-py clients (Oona's connection factory) and the
same batch size and block time. A round trip is timed from the publish call until the
consumer's ack has returned (raw: XACK; Oona: the commit, reported by ``on_committed``).

Both pipelines run side by side (each on its own stream) and take turns in short chunks: serial
round trips in chunks of ``CHUNK`` messages, then bursts of ``CHUNK`` messages with ``IN_FLIGHT``
publishers. A slow spell of a shared machine then lands on both sides instead of on whichever
ran at the time, so the ratios hold still from run to run even where single timings do not.

Run: .venv/bin/python benchmarks/bus_roundtrip.py   (last line is JSON; BENCH_N messages per
pipeline and measure, default 5000)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis

from esper.core.redis_server import RedisServer, ServerOptions
from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import DeliveryPolicy, OonaClient, OonaMessage, StreamConfig
from esper.oona.connection import connect
from esper.security.signing import KeyRing

N = int(os.environ.get("BENCH_N", "5000"))
CHUNK = 250
WARM_UP = 200
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


@dataclass
class Pipeline:
    """One publish path and its consumer; ``arrived`` gets one item per acknowledged message."""

    name: str
    publish: Callable[[], Awaitable[object]]
    arrived: asyncio.Queue[None] = field(default_factory=asyncio.Queue)
    latencies_ms: list[float] = field(default_factory=list)
    burst_s: float = 0.0
    burst_messages: int = 0
    sent: int = 0

    async def serial(self, count: int, *, record: bool = True) -> None:
        self.sent += count
        for _ in range(count):
            start = time.perf_counter()
            await self.publish()
            await self.arrived.get()
            if record:
                self.latencies_ms.append((time.perf_counter() - start) * 1000)

    async def burst(self, count: int) -> None:
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def one() -> None:
            async with limit:
                await self.publish()

        self.sent += count
        start = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(count):
                group.create_task(one())
        for _ in range(count):
            await self.arrived.get()
        self.burst_s += time.perf_counter() - start
        self.burst_messages += count


async def _raw_consumer(
    redis: aioredis.Redis, stream: str, arrived: asyncio.Queue[None], stop: asyncio.Event
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
                arrived.put_nowait(None)


@asynccontextmanager
async def raw_pipeline(url: str) -> AsyncIterator[Pipeline]:
    stream = "raw.bench"
    pub, sub = connect(url, _config("raw-pub")), connect(url, _config("raw-0"))
    await pub.xgroup_create(stream, GROUP, id="0", mkstream=True)

    async def publish() -> None:
        await pub.xadd(stream, {b"payload": BODY})

    pipeline = Pipeline("raw", publish)
    stop = asyncio.Event()
    consumer = asyncio.create_task(_raw_consumer(sub, stream, pipeline.arrived, stop))
    try:
        yield pipeline
    finally:
        # Python 3.11's wait_for (inside redis-py's send) can swallow a cancellation; the event
        # ends the loop at its next read even then.
        stop.set()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await pub.aclose()
        await sub.aclose()


@asynccontextmanager
async def oona_pipeline(url: str) -> AsyncIterator[Pipeline]:
    ring = KeyRing(SECRET)
    pub, sub = OonaClient(url, _config("oona-pub"), ring), OonaClient(url, _config("oona-0"), ring)

    async def handler(message: OonaMessage) -> None:
        _ = message.payload

    async def publish() -> None:
        result = await pub.publish(CMD, BODY)
        assert result.ok, result

    pipeline = Pipeline("oona", publish)

    def committed(ids: list[str]) -> None:
        for _ in ids:
            pipeline.arrived.put_nowait(None)

    subscription = sub.subscribe("oona.normal", GROUP, handler, types={CMD}, on_committed=committed)
    try:
        async with running(subscription.run, "bench"):
            yield pipeline
        handled = sub.metrics_snapshot().get("consumed.oona.normal")
        assert handled == pipeline.sent, f"handled {handled} of {pipeline.sent}"
    finally:
        await pub.aclose()
        await sub.aclose()


async def measure(url: str) -> tuple[Pipeline, Pipeline]:
    async with raw_pipeline(url) as raw, oona_pipeline(url) as oona:
        pair = (raw, oona)
        for pipeline in pair:
            await pipeline.serial(WARM_UP, record=False)
        done = 0
        while done < N:
            count = min(CHUNK, N - done)
            for pipeline in pair:
                await pipeline.serial(count)
            for pipeline in pair:
                await pipeline.burst(count)
            done += count
            if done % 1000 == 0 or done == N:
                print(f"{done}/{N} messages per pipeline and measure", flush=True)
        return raw, oona


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(ServerOptions(data_dir=Path(tmp)))
        server.start()
        try:
            print(f"server on port {server.port}; {N} messages of ~{len(BODY)} bytes, chunks of {CHUNK}")
            raw, oona = await measure(server.url)
        finally:
            server.stop()
    p50 = {p.name: statistics.median(p.latencies_ms) for p in (raw, oona)}
    rate = {p.name: p.burst_messages / p.burst_s for p in (raw, oona)}
    for name in ("raw", "oona"):
        print(f"{name:4s}: p50 {p50[name]:.3f} ms, {rate[name]:,.0f} msgs/s", flush=True)
    print(
        json.dumps(
            {
                "raw_p50_ms": round(p50["raw"], 4),
                "oona_p50_ms": round(p50["oona"], 4),
                "p50_ratio": round(p50["oona"] / p50["raw"], 3),
                "raw_msgs_per_s": round(rate["raw"], 1),
                "oona_msgs_per_s": round(rate["oona"], 1),
                "throughput_ratio": round(rate["oona"] / rate["raw"], 3),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
