"""Circuit breakers: separate publish/consume, HALF_OPEN re-opens at once, open means wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from esper.core.redis_server import free_port
from esper.leyline import leyline_pb2 as pb
from esper.oona import CircuitBreaker, OonaClient


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_states() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("t", failure_threshold=2, timeout_ms=1000, clock=clock)
    assert breaker.state == pb.CIRCUIT_STATE_CLOSED
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == pb.CIRCUIT_STATE_CLOSED  # success reset the count
    breaker.record_failure()
    assert breaker.state == pb.CIRCUIT_STATE_OPEN
    assert breaker.remaining_s() == pytest.approx(1.0)
    clock.now += 1.0
    assert breaker.state == pb.CIRCUIT_STATE_HALF_OPEN
    breaker.record_failure()  # one failure while half-open re-opens
    assert breaker.state == pb.CIRCUIT_STATE_OPEN
    clock.now += 1.0
    breaker.record_success()
    assert breaker.state == pb.CIRCUIT_STATE_CLOSED


async def test_open_publish_breaker_waits_instead_of_spinning(make_client: Callable[..., OonaClient]) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    client = make_client(
        dead_url, breaker_failure_threshold=2, breaker_timeout_ms=150, publish_breaker_wait_ms=50
    )
    attempts = 0
    original = client.redis.xadd

    async def counting_xadd(*args: object, **kwargs: object) -> object:
        nonlocal attempts
        attempts += 1
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    client.redis.xadd = counting_xadd  # type: ignore[method-assign]
    results = [await client.publish_command(pb.AdaptationCommand()) for _ in range(2)]
    assert [r.reason for r in results] == ["redis_error", "redis_error"]
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_OPEN
    assert client.consume_breaker.state == pb.CIRCUIT_STATE_CLOSED  # publish failures stay on their side
    # A tight caller loop while open: each call sleeps (50 ms cap) rather than returning instantly,
    # and no XADD is attempted until the breaker half-opens.
    loop = asyncio.get_running_loop()
    start = loop.time()
    refused = [await client.publish_command(pb.AdaptationCommand()) for _ in range(2)]
    assert [r.reason for r in refused] == ["breaker_open", "breaker_open"]
    assert loop.time() - start >= 0.09
    assert attempts == 2
    assert client.publish_breaker.waits == 2
    # After the timeout a single trial call is let through; its failure re-opens immediately.
    await asyncio.sleep(0.06)
    trial = await client.publish_command(pb.AdaptationCommand())
    assert trial.reason == "redis_error"
    assert attempts == 3
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_OPEN


async def test_consume_breaker_counts_read_errors_and_consumer_waits(
    make_client: Callable[..., OonaClient],
) -> None:
    dead_url = f"redis://127.0.0.1:{free_port()}/0"
    client = make_client(
        dead_url, breaker_failure_threshold=2, breaker_timeout_ms=200, reconnect_base_ms=1, reconnect_max_ms=2
    )
    reads = 0
    original = client.redis.xreadgroup

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal reads
        reads += 1
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    client.redis.xreadgroup = counting  # type: ignore[method-assign]

    async def never(message: object) -> None:
        raise AssertionError("nothing to handle")

    consumer = client.consumer("oona.normal", never, types={pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND})
    task = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.3)
    await consumer.stop()
    await task
    assert client.consume_breaker.state in (pb.CIRCUIT_STATE_OPEN, pb.CIRCUIT_STATE_HALF_OPEN)
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED
    # 300 ms with a 200 ms open period: a handful of attempts, not a hot spin.
    assert 2 <= reads <= 6
    assert client.consume_breaker.waits >= 1
