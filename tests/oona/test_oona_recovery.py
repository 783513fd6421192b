"""Outages: a server restart, a server that drops every connection, and stopping an idle reader."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, Recorder, command

from esper.core.redis_server import RedisServer
from esper.core.worker import WorkerContext, running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient


class DroppingServer:
    """A TCP server that closes every connection at once; each accepted connection is counted."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[float] = asyncio.Queue()
        self.count = 0
        self.server: asyncio.Server | None = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        self.connections.put_nowait(time.monotonic())
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"


@pytest.fixture
async def dropping() -> AsyncIterator[DroppingServer]:
    server = DroppingServer()
    server.server = await asyncio.start_server(server._accept, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


async def test_after_a_server_restart_the_bus_answers_again_at_once(
    redis_server_factory: Callable[..., RedisServer], make_client: Callable[..., OonaClient]
) -> None:
    server = redis_server_factory(append_only=True)
    client = make_client(server.url)
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD})
    async with running(sub.run, "a"):
        assert (await client.publish_command(command("before"))).ok
        await recorder.wait()
        await asyncio.to_thread(server.stop)
        await asyncio.to_thread(server.start)  # the same port and data
        back = time.monotonic()
        # Every pooled connection is dead now; the first command on one is retried once.
        assert (await client.publish_command(command("after"))).ok
        recorder.expect(2)
        await recorder.wait()
        answered_s = time.monotonic() - back
    assert recorder.ids == ["before", "after"]
    assert answered_s < 3.0  # behaviour about time: within a couple of seconds, generous bound
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED
    assert not client.problems()


async def test_an_open_publish_breaker_refuses_without_touching_the_server(
    dropping: DroppingServer, make_client: Callable[..., OonaClient]
) -> None:
    client = make_client(
        dropping.url, breaker_failure_threshold=2, breaker_open_ms=60_000, publish_breaker_wait_ms=20
    )
    results = [await client.publish_command(command("x")) for _ in range(2)]
    assert [r.reason for r in results] == ["redis_error", "redis_error"]
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_OPEN
    assert client.consume_breaker.state == pb.CIRCUIT_STATE_CLOSED  # publish failures stay on their side
    tried = dropping.count
    assert tried >= 2
    refused = [await client.publish_command(command("x")) for _ in range(3)]
    assert [r.reason for r in refused] == ["breaker_open"] * 3
    assert dropping.count == tried  # no connection was attempted while open
    assert client.publish_breaker.waits == 3  # each refusal waited (up to 20 ms) instead of spinning
    assert any("publish breaker open" in problem for problem in client.problems())


async def test_a_reader_waits_out_an_outage_with_growing_backoff_instead_of_spinning(
    dropping: DroppingServer, make_client: Callable[..., OonaClient]
) -> None:
    client = make_client(
        dropping.url, breaker_failure_threshold=2, reconnect_base_ms=100, reconnect_max_ms=400
    )
    sub = client.subscribe(NORMAL, "a", Recorder(), types={CMD})
    # Run without ``running``: the reader never starts (no group can be created), and cancelling
    # it during an outage must end it.
    ctx_task = asyncio.create_task(sub.run(WorkerContext("outage")))
    try:
        stamps = [await asyncio.wait_for(dropping.connections.get(), 10) for _ in range(8)]
    finally:
        ctx_task.cancel()
        done, _pending = await asyncio.wait({ctx_task}, timeout=10)
    assert done  # a cancellation during an outage ends the reader
    assert ctx_task.cancelled()
    # Each failed call is two connections (the connection's one retry), then a wait of
    # 100, 200, 400, 400 ms: the behaviour is about time, so the lower bound is the assertion.
    assert stamps[-1] - stamps[0] >= 0.9 * (0.1 + 0.2 + 0.4)
    assert client.consume_breaker.state in (pb.CIRCUIT_STATE_OPEN, pb.CIRCUIT_STATE_HALF_OPEN)
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED
    assert any("cannot read" in problem for problem in client.problems())


async def test_stop_abandons_an_idle_read_at_once_and_loses_nothing(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(block_ms=30_000)
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD})
    async with running(sub.run, "a"):
        await client.publish_command(command("one"))
        await recorder.wait()
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 5.0  # far below the 30 s block: the read was abandoned
    await client.publish_command(command("two"))
    async with running(sub.run, "a"):
        recorder.expect(2)
        await recorder.wait()
    assert recorder.ids == ["one", "two"]
    assert int((await redis_client.xpending(NORMAL, "a"))["pending"]) == 0
