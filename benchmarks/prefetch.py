"""Kernel prefetch over the bus: request published -> KernelArtifactReady consumed.

One private Redis-protocol server, an Urza library populated by the forge,
and the prefetch worker running in its own process (as it does inside
Weatherlight). The requester asks for kernels 2,000 times one at a time
(latency), then with 64 requests in flight (throughput).

Run: .venv/bin/python benchmarks/prefetch.py   (last line is JSON)
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

from prometheus_client import CollectorRegistry

from esper.core.redis_server import RedisServer, ServerOptions
from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, StreamConfig
from esper.security import KeyRing
from esper.tezzeret import TezzeretCompiler
from esper.urza import UrzaLibrary
from esper.urza.prefetch import UrzaPrefetchWorker

N = int(os.environ.get("BENCH_N", "2000"))
IN_FLIGHT = 64
SECRET = b"prefetch-benchmark-secret-0123456789"
BLUEPRINTS = ("BP001", "BP002", "BP003", "BP009", "BP012", "BP014", "BP021", "BP022")
READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY


def populate(root: Path) -> str:
    database = f"sqlite:///{root / 'catalog.db'}"
    catalog = KarnCatalog()
    with UrzaLibrary(root / "artifacts", database, registry=CollectorRegistry()) as library:
        compiler = TezzeretCompiler(library.root, catalog=catalog, prewarm_iterations=5)
        for bid in BLUEPRINTS:
            result = compiler.compile(bid, None, d=32)
            library.save(
                catalog.get(bid),
                result.artifact_path,
                result.catalog_update,
                prewarm_samples=result.prewarm_samples_ms,
            )
    return database


def worker_process(url: str, root: str, database: str, control: Connection) -> None:
    async def main() -> None:
        library = UrzaLibrary(Path(root) / "artifacts", database, registry=CollectorRegistry())
        client = OonaClient(url, StreamConfig(instance="urza-bench", block_ms=500), KeyRing(SECRET))
        worker = UrzaPrefetchWorker(client, library, concurrency=32, batch=128)
        async with running(worker.run, "prefetch"):
            control.send("ready")
            await asyncio.to_thread(control.recv)
        control.send(worker.metrics_snapshot())
        await client.aclose()
        library.close()

    asyncio.run(main())


async def requester(url: str) -> tuple[list[float], float]:
    client = OonaClient(url, StreamConfig(instance="bench-trainer", block_ms=500), KeyRing(SECRET))
    waiting: dict[str, asyncio.Future[float]] = {}

    async def on_ready(message: OonaMessage) -> None:
        reply = message.decode(pb.KernelArtifactReady)
        future = waiting.pop(reply.request_id, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def ask(index: int) -> float:
        request = pb.KernelPrefetchRequest(
            request_id=uuid.uuid4().hex,
            blueprint_id=BLUEPRINTS[index % len(BLUEPRINTS)],
            training_run_id="bench",
        )
        request.issued_at.GetCurrentTime()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiting[request.request_id] = future
        started = time.perf_counter()
        result = await client.publish_kernel_prefetch_request(request)
        assert result.ok, result
        return (await asyncio.wait_for(future, 30)) - started

    consumer = client.broadcast("oona.kernels.ready", on_ready, types={READY}, batch=256)
    async with running(consumer.run, "replies"):
        for i in range(50):  # warm-up: connections, caches, verified-file memo
            await ask(i)
        serial = []
        for i in range(N):
            serial.append((await ask(i)) * 1000)
            if (i + 1) % 500 == 0:
                print(f"  serial {i + 1}/{N}", flush=True)
        limit = asyncio.Semaphore(IN_FLIGHT)

        async def bounded(i: int) -> None:
            async with limit:
                await ask(i)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as burst:
            for i in range(N):
                burst.create_task(bounded(i))
        rate = N / (time.perf_counter() - started)
    await client.aclose()
    return serial, rate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"forging {len(BLUEPRINTS)} kernels (d=32) into a fresh Urza library", flush=True)
        database = populate(root)
        server = RedisServer(ServerOptions(data_dir=root / "redis"))
        server.start()
        parent, child = mp.get_context("spawn").Pipe()
        process = mp.get_context("spawn").Process(
            target=worker_process, args=(server.url, tmp, database, child)
        )
        process.start()
        try:
            assert parent.recv() == "ready"
            print(f"prefetch worker running (pid {process.pid}); {N} requests", flush=True)
            serial, rate = asyncio.run(requester(server.url))
            parent.send("stop")
            print(f"worker answers: {parent.recv()}", flush=True)
        finally:
            process.join(timeout=30)
            server.stop()
    serial.sort()
    p50 = statistics.median(serial)
    p99 = serial[int(len(serial) * 0.99) - 1]
    print(f"serial p50 {p50:.3f} ms, p99 {p99:.3f} ms; {rate:,.0f} answers/s with {IN_FLIGHT} in flight")
    print(
        json.dumps(
            {
                "serial_p50_ms": round(p50, 4),
                "serial_p99_ms": round(p99, 4),
                "concurrent_per_s": round(rate, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
