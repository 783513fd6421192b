"""Chaos run: kernel requests answered through faults, counting lost and duplicate answers.

Starts a private Redis-protocol server (append-only, fsync always, so the
server itself loses nothing it acknowledged), forges two kernels into a shared
Urza library, boots ``--replicas`` real ``esper-weatherlight-service``
processes on it (each with its own var dir), and sends kernel prefetch
requests at ``--rate`` per second from a trainer-like client while it

1. kills one replica with SIGKILL in the middle of its work and restarts it
   on the same var dir (it resumes its own pending requests under its name);
2. restarts the Redis server (SIGTERM, then a new process on the same port
   and files);
3. kills another replica for good (its pending requests are taken over by the
   others after ``OONA_CLAIM_IDLE_MS``, default 15 s).

Every request is published until the bus accepts it (a refused publish during
the outage is retried). At the end it reports how many accepted requests got
no answer (lost), how many got more than one (duplicates), the latency
percentiles, and the slowest answer to a request sent during each fault.

Run: .venv/bin/python benchmarks/chaos.py [--replicas 3] [--seconds 30] [--rate 200]
(the last line is JSON)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service_replicas import Replica

from esper.core.redis_server import RedisServer, ServerOptions, free_port
from esper.core.worker import running
from esper.karn import KarnCatalog
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, StreamConfig, connect
from esper.security import KeyRing
from esper.tezzeret import TezzeretForge
from esper.urza import UrzaLibrary

SECRET = "chaos-benchmark-secret-0123456789abcdef"
BLUEPRINTS = ("BP001", "BP009")
REQUESTS = "oona.kernels.requests"


@dataclass
class Ledger:
    sent: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    replies: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    faults: list[tuple[str, float]] = field(default_factory=list)
    closed: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_reply(self, request_id: str) -> None:
        if request_id not in self.sent:
            return
        self.replies[request_id] = self.replies.get(request_id, 0) + 1
        self.answered.setdefault(request_id, time.monotonic())
        self.check()

    def check(self) -> None:
        """Set ``done`` once the load has ended and every request it sent has an answer."""
        if self.closed and len(self.answered) == len(self.sent):
            self.done.set()


async def load(client: OonaClient, ledger: Ledger, seconds: float, rate: float) -> None:
    interval = 1.0 / rate
    start = time.monotonic()
    index = 0
    while time.monotonic() - start < seconds:
        request = pb.KernelPrefetchRequest(
            request_id=uuid.uuid4().hex, blueprint_id=BLUEPRINTS[index % 2], training_run_id="chaos"
        )
        index += 1
        ledger.sent[request.request_id] = time.monotonic()  # before publishing: the answer can be quick
        while True:
            request.issued_at.GetCurrentTime()
            result = await client.publish_kernel_prefetch_request(request)
            if result.ok:
                break
            ledger.refused += 1
            await asyncio.sleep(0.05)  # the publisher's own retry pacing, not a poll of the system under test
        await asyncio.sleep(max(0.0, start + index * interval - time.monotonic()))


async def frozen_holding_work(redis: Any, replicas: list[Replica], limit_s: float = 10.0) -> Replica:
    """Freeze (SIGSTOP) a replica at a moment it holds unacknowledged requests, so a kill is mid-batch."""
    deadline = time.monotonic() + limit_s
    while True:
        slots = await redis.hgetall("oona:instances:weatherlight")
        names = {v.decode().split("|")[0]: f"weatherlight-{k.decode()}" for k, v in slots.items()}
        for replica in (r for r in replicas if r.alive):
            name = names.get(replica.token())
            if name is None:
                continue
            replica.freeze()
            held = await redis.xpending_range(REQUESTS, "urza-prefetch", "-", "+", 10, consumername=name)
            if held or time.monotonic() > deadline:
                return replica  # frozen: whatever it holds now stays unacknowledged
            replica.thaw()
        await asyncio.sleep(0.001)  # watching for a moment when a replica holds work: no event exists


async def faults(replicas: list[Replica], server: RedisServer, ledger: Ledger, seconds: float) -> None:
    async def at(fraction: float) -> None:
        await asyncio.sleep(max(0.0, start + fraction * seconds - time.monotonic()))

    start = time.monotonic()
    watcher = connect(server.url, StreamConfig(instance="chaos-watch"))  # retries a dead connection once
    try:
        await at(0.2)
        victim = await frozen_holding_work(watcher, replicas)
        ledger.faults.append(("kill -9 mid-batch and restart a replica", time.monotonic()))
        victim.kill()
        await asyncio.to_thread(victim.start)
        await at(0.45)
        ledger.faults.append(("restart the Redis server", time.monotonic()))
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)
        await at(0.7)
        if len(replicas) > 1:
            victim = await frozen_holding_work(watcher, replicas)
            ledger.faults.append(("lose a replica for good, mid-batch", time.monotonic()))
            victim.kill()
    finally:
        await watcher.aclose()


async def drive(
    url: str, replicas: list[Replica], server: RedisServer, seconds: float, rate: float
) -> Ledger:
    ledger = Ledger()
    trainer = OonaClient(url, StreamConfig(instance="chaos-trainer"), KeyRing(SECRET.encode()))

    async def on_ready(message: OonaMessage) -> None:
        ledger.on_reply(message.decode(pb.KernelArtifactReady).request_id)

    async def on_error(message: OonaMessage) -> None:
        ledger.on_reply(message.decode(pb.KernelArtifactError).request_id)

    ready = trainer.broadcast(
        "oona.kernels.ready",
        on_ready,
        types={pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY},
        ignore_types={pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE},
        batch=512,
    )
    errors = trainer.broadcast(
        "oona.kernels.errors", on_error, types={pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_ERROR}, batch=512
    )
    async with running(ready.run, "ready"), running(errors.run, "errors"):
        async with asyncio.TaskGroup() as group:
            group.create_task(load(trainer, ledger, seconds, rate))
            group.create_task(faults(replicas, server, ledger, seconds))
        ledger.closed = True
        ledger.check()
        print(f"sent {len(ledger.sent)} requests; waiting for the last answers", flush=True)
        try:
            await asyncio.wait_for(ledger.done.wait(), 60)
        except TimeoutError:
            missing = [r for r in ledger.sent if r not in ledger.answered]
            pending = await trainer.redis.xpending(REQUESTS, "urza-prefetch")
            print(f"{len(missing)} requests were never answered; pending now: {pending}", flush=True)
    await trainer.aclose()
    return ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with UrzaLibrary(root / "urza", f"sqlite:///{root / 'urza' / 'catalog.db'}") as library:
            TezzeretForge(KarnCatalog(), library).run(16, list(BLUEPRINTS))
        port = free_port()
        server = RedisServer(
            ServerOptions(
                data_dir=root / "redis", port=port, append_only=True, extra_args=("--appendfsync", "always")
            )
        )
        server.start()
        shared = {
            "URZA_ARTIFACT_DIR": str(root / "urza"),
            "URZA_DATABASE_URL": f"sqlite:///{root / 'urza' / 'catalog.db'}",
        }
        replicas = [
            Replica(
                f"replica-{i}", root / f"replica-{i}", secret=SECRET, redis_url=server.url, extra_env=shared
            )
            for i in range(args.replicas)
        ]
        try:
            for replica in replicas:
                replica.start()
            print(
                f"{args.replicas} replicas ready; {args.rate:.0f} requests/s for {args.seconds:.0f} s",
                flush=True,
            )
            ledger = asyncio.run(drive(server.url, replicas, server, args.seconds, args.rate))
        finally:
            for replica in replicas:
                replica.stop()
            server.stop()
    latencies = sorted(ledger.answered[r] - ledger.sent[r] for r in ledger.answered)
    lost = [r for r in ledger.sent if r not in ledger.answered]
    duplicates = sum(1 for n in ledger.replies.values() if n > 1)
    slowest: dict[str, float] = {}
    for name, at in ledger.faults:
        during = [
            ledger.answered.get(r, float("inf")) - t for r, t in ledger.sent.items() if at - 1 <= t <= at + 5
        ]
        slowest[name] = round(max(during, default=0.0), 3)
    print(
        json.dumps(
            {
                "replicas": args.replicas,
                "requests": len(ledger.sent),
                "publishes_refused_then_retried": ledger.refused,
                "lost": len(lost),
                "duplicates": duplicates,
                "p50_s": round(statistics.median(latencies), 4) if latencies else None,
                "p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 3) if latencies else None,
                "max_s": round(latencies[-1], 3) if latencies else None,
                "slowest_after_fault_s": slowest,
            }
        )
    )


if __name__ == "__main__":
    main()
