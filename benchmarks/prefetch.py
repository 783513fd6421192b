"""Kernel prefetch over the bus: request published -> KernelArtifactReady consumed.

Both modes start one private Redis-protocol server, forge kernels into a
fresh Urza library and drive them from a trainer-like client that publishes
``KernelPrefetchRequest``s and waits for each answer on the reply stream.

Single worker (the default): the prefetch worker runs in its own process (as
it does inside Weatherlight). The client asks 2,000 times one at a time
(``serial_p50_ms``/``serial_p99_ms``), then with 64 requests in flight
(``concurrent_per_s``). ``BENCH_N`` changes the count.

Replicas (``--replicas [N,N...]``, default 1,2,3): for each count N, N real
``esper-weatherlight-service`` processes, each with its own var dir and HTTP
port, all on one fresh private server and one Urza library and catalogue
(SQLite, or PostgreSQL with ``--database postgresql://...`` in a private
schema dropped afterwards), each booted until it sends READY=1 on its notify
socket. After a warm-up the client keeps 64 requests in flight for
``--requests`` answers; per N it reports ``answers_per_s`` and the CPU per
answered request over the measured interval: the services' (user+system
time of every replica, from ``/proc``), the server's, their sum
(``cpu_ms_per_request``), and the client's for reference; also the
replicas' wakeups (voluntary context switches) and the server's commands per
request, and how the answers split between the replicas. ``--repeat K``
runs the counts K times, interleaved, and reports medians (the machine's
other load moves single runs a lot). ``throughput_ratio`` and
``cpu_per_request_ratio`` compare the last count with the first.
``BENCH_IN_FLIGHT`` changes the 64.

Run: .venv/bin/python benchmarks/prefetch.py [--replicas [1,2,3]] [--requests 12000]
[--repeat 1] [--database URL]   (the last line is JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from service_replicas import Replica, context_switches, cpu_seconds

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
IN_FLIGHT = int(os.environ.get("BENCH_IN_FLIGHT", "64"))
SECRET = "prefetch-benchmark-secret-0123456789"
BLUEPRINTS = ("BP001", "BP002", "BP003", "BP009", "BP012", "BP014", "BP021", "BP022")
READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
ERROR = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR
CATALOG_UPDATE = pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE


def populate(root: Path, database: str) -> None:
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


class Trainer:
    """A trainer-like client: publishes requests and waits for each one's answer (ready or error)."""

    def __init__(self, url: str) -> None:
        self.client = OonaClient(
            url, StreamConfig(instance="bench-trainer", block_ms=500), KeyRing(SECRET.encode())
        )
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.errors: list[str] = []

    async def _answered(self, request_id: str) -> None:
        future = self.waiting.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    async def _on_ready(self, message: OonaMessage) -> None:
        await self._answered(message.decode(pb.KernelArtifactReady).request_id)

    async def _on_error(self, message: OonaMessage) -> None:
        error = message.decode(pb.KernelArtifactError)
        self.errors.append(error.reason)
        await self._answered(error.request_id)

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Trainer]:
        ready = self.client.broadcast(
            "oona.kernels.ready", self._on_ready, types={READY}, ignore_types={CATALOG_UPDATE}, batch=256
        )
        errors = self.client.broadcast("oona.kernels.errors", self._on_error, types={ERROR}, batch=256)
        try:
            async with running(ready.run, "replies"), running(errors.run, "errors"):
                yield self
        finally:
            await self.client.aclose()

    async def ask(self, index: int) -> float:
        """One request, answered: its round trip in seconds."""
        request = pb.KernelPrefetchRequest(
            request_id=uuid.uuid4().hex,
            blueprint_id=BLUEPRINTS[index % len(BLUEPRINTS)],
            training_run_id="bench",
        )
        request.issued_at.GetCurrentTime()
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[request.request_id] = future
        started = time.perf_counter()
        result = await self.client.publish_kernel_prefetch_request(request)
        assert result.ok, result
        return (await asyncio.wait_for(future, 30)) - started

    async def burst(self, count: int, *, progress: Callable[[int], None] | None = None) -> float:
        """``count`` requests with ``IN_FLIGHT`` outstanding at any time; the seconds it took."""
        limit = asyncio.Semaphore(IN_FLIGHT)
        done = 0
        every = max(1, count // 4)

        async def bounded(i: int) -> None:
            nonlocal done
            async with limit:
                await self.ask(i)
            done += 1
            if progress is not None and done % every == 0:
                progress(done)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                group.create_task(bounded(i))
        return time.perf_counter() - started


# -- single worker ------------------------------------------------------------------------------


def worker_process(url: str, root: str, database: str, control: Connection) -> None:
    async def main() -> None:
        library = UrzaLibrary(Path(root) / "artifacts", database, registry=CollectorRegistry())
        client = OonaClient(url, StreamConfig(instance="urza-bench", block_ms=500), KeyRing(SECRET.encode()))
        worker = UrzaPrefetchWorker(client, library, concurrency=32, batch=128)
        async with running(worker.run, "prefetch"):
            control.send("ready")
            await asyncio.to_thread(control.recv)
        control.send(worker.metrics_snapshot())
        await client.aclose()
        library.close()

    asyncio.run(main())


async def single_requester(url: str) -> tuple[list[float], float]:
    async with Trainer(url).serving() as trainer:
        for i in range(50):  # warm-up: connections, caches, verified-file memo
            await trainer.ask(i)
        serial = []
        for i in range(N):
            serial.append((await trainer.ask(i)) * 1000)
            if (i + 1) % 500 == 0:
                print(f"  serial {i + 1}/{N}", flush=True)
        rate = N / await trainer.burst(N)
        assert not trainer.errors, trainer.errors
    return serial, rate


def single_worker() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        database = f"sqlite:///{root / 'catalog.db'}"
        print(f"forging {len(BLUEPRINTS)} kernels (d=32) into a fresh Urza library", flush=True)
        populate(root, database)
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
            serial, rate = asyncio.run(single_requester(server.url))
            parent.send("stop")
            print(f"worker answers: {parent.recv()}", flush=True)
        finally:
            process.join(timeout=30)
            server.stop()
    serial.sort()
    p50 = statistics.median(serial)
    p99 = serial[int(len(serial) * 0.99) - 1]
    print(f"serial p50 {p50:.3f} ms, p99 {p99:.3f} ms; {rate:,.0f} answers/s with {IN_FLIGHT} in flight")
    return {
        "serial_p50_ms": round(p50, 4),
        "serial_p99_ms": round(p99, 4),
        "concurrent_per_s": round(rate, 1),
    }


# -- replicas -------------------------------------------------------------------------------------


@contextmanager
def catalogue(root: Path, database: str | None) -> Iterator[str]:
    """The shared catalogue's URL: a SQLite file, or a private schema of ``database`` (PostgreSQL)."""
    if database is None:
        yield f"sqlite:///{root / 'catalog.db'}"
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _postgres import private_schema  # the tests' helper: one way to make (and drop) a schema

    with private_schema(database, prefix="esper_bench") as url:
        yield url


def server_calls(url: str) -> dict[str, int]:
    """Commands the server has run so far, by name (``INFO commandstats``)."""
    with redis.Redis.from_url(url) as admin:
        stats: dict[str, Any] = admin.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}


def answered_by(replicas: Sequence[Replica]) -> list[float]:
    return [float(r.status()["components"].get("urza.prefetch.total", 0.0)) for r in replicas]


async def measure(url: str, server_pid: int, replicas: Sequence[Replica], requests: int) -> dict[str, Any]:
    n = len(replicas)
    async with Trainer(url).serving() as trainer:
        warm_up = 250 * n  # every replica: connections, its verified-file memo, its group membership
        await trainer.burst(warm_up)
        split_before = await asyncio.to_thread(answered_by, replicas)
        calls_before = await asyncio.to_thread(server_calls, url)
        services_before = sum(r.cpu_seconds() for r in replicas)
        switches_before = sum(context_switches(r.pid) for r in replicas)
        server_before = cpu_seconds(server_pid)
        client_before = cpu_seconds(os.getpid())
        elapsed = await trainer.burst(
            requests, progress=lambda done: print(f"  N={n}: {done}/{requests} answered", flush=True)
        )
        services = sum(r.cpu_seconds() for r in replicas) - services_before
        switches = sum(context_switches(r.pid) for r in replicas) - switches_before
        server = cpu_seconds(server_pid) - server_before
        client = cpu_seconds(os.getpid()) - client_before
        calls_after = await asyncio.to_thread(server_calls, url)
        split_after = await asyncio.to_thread(answered_by, replicas)
        assert not trainer.errors, sorted(set(trainer.errors))
    per_request_ms = 1000 / requests
    return {
        "replicas": n,
        "answers_per_s": round(requests / elapsed, 1),
        "cpu_ms_per_request": round((services + server) * per_request_ms, 4),
        "service_cpu_ms_per_request": round(services * per_request_ms, 4),
        "valkey_cpu_ms_per_request": round(server * per_request_ms, 4),
        "client_cpu_ms_per_request": round(client * per_request_ms, 4),
        "service_wakeups_per_request": round(switches / requests, 3),
        "server_calls_per_request": {
            name: round((calls - calls_before.get(name, 0)) / requests, 3)
            for name, calls in sorted(calls_after.items())
            if calls - calls_before.get(name, 0) > requests // 100
        },
        "split": [int(after - before) for before, after in zip(split_before, split_after, strict=True)],
    }


def one_count(root: Path, run: int, n: int, database: str, requests: int) -> dict[str, Any]:
    round_dir = root / f"run{run}-n{n}"
    server = RedisServer(ServerOptions(data_dir=round_dir / "redis"))
    server.start()
    replicas = [
        Replica(
            f"replica-{i}",
            round_dir / f"replica-{i}",
            secret=SECRET,
            redis_url=server.url,
            extra_env={"URZA_ARTIFACT_DIR": str(root / "artifacts"), "URZA_DATABASE_URL": database},
        )
        for i in range(n)
    ]
    try:
        began = time.monotonic()
        for replica in replicas:
            replica.start()
        print(f"N={n}: {n} replica(s) ready in {time.monotonic() - began:.1f} s", flush=True)
        assert server.pid is not None
        result = asyncio.run(measure(server.url, server.pid, replicas, requests))
    finally:
        codes = [replica.stop() for replica in replicas]
        server.stop()
    assert all(code == 0 for code in codes), f"replicas exited with {codes}; logs under {round_dir}"
    print(
        f"N={n}: {result['answers_per_s']:,.0f} answers/s, {result['cpu_ms_per_request']:.3f} ms CPU "
        f"per request (services {result['service_cpu_ms_per_request']:.3f}, valkey "
        f"{result['valkey_cpu_ms_per_request']:.3f}); split {result['split']}",
        flush=True,
    )
    return result


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per count: the median of every measure over the repeats (the split and calls of the median run)."""
    ordered = sorted(runs, key=lambda r: r["answers_per_s"])
    middle = dict(ordered[len(ordered) // 2])
    for key in ("answers_per_s", *(k for k in runs[0] if k.endswith("_per_request"))):
        if isinstance(runs[0][key], float | int):
            middle[key] = round(statistics.median(r[key] for r in runs), 4)
    middle["answers_per_s_runs"] = [r["answers_per_s"] for r in runs]
    return middle


def replicas_mode(counts: Sequence[int], requests: int, repeat: int, database: str | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with catalogue(root, database) as url:
            print(f"forging {len(BLUEPRINTS)} kernels (d=32) into a fresh Urza library", flush=True)
            populate(root, url)
            runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
            for run in range(repeat):  # interleaved, so a noisy moment touches every count alike
                for n in counts:
                    runs[n].append(one_count(root, run, n, url, requests))
    results = [median_of(runs[n]) for n in counts]
    report: dict[str, Any] = {
        "mode": "replicas",
        "cores": os.cpu_count(),
        "in_flight": IN_FLIGHT,
        "requests": requests,
        "repeat": repeat,
        "database": "postgresql" if database else "sqlite",
        "results": results,
    }
    first, last = results[0], results[-1]
    if len(results) > 1:
        report["throughput_ratio"] = round(last["answers_per_s"] / first["answers_per_s"], 3)
        report["cpu_per_request_ratio"] = round(last["cpu_ms_per_request"] / first["cpu_ms_per_request"], 3)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--replicas",
        nargs="?",
        const="1,2,3",
        default=None,
        metavar="N[,N...]",
        help="run service replicas instead of one worker: these counts (default with the flag: 1,2,3)",
    )
    parser.add_argument("--requests", type=int, default=12000, help="measured answers per count (replicas)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per count, interleaved; medians (replicas)"
    )
    parser.add_argument(
        "--database", default=None, help="a PostgreSQL URL for the shared catalogue (replicas)"
    )
    args = parser.parse_args()
    if args.replicas is None:
        report = single_worker()
    else:
        counts = [int(part) for part in args.replicas.split(",") if part.strip()]
        report = replicas_mode(counts, args.requests, max(1, args.repeat), args.database)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
