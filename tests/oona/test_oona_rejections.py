"""Every rejection reason lands in the dead letter stream, in the documented format."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import Recorder, dead_letters, running

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage
from esper.security.signing import KeyRing

CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
STREAM = "oona.normal"


def envelope(
    *, message_type: int = CMD, issued_at_ms: int | None = None, nonce: str | None = None, **extra: str
) -> bytes:
    env = pb.BusEnvelope(
        message_type=message_type, payload=pb.AdaptationCommand(command_id="x").SerializeToString()
    )
    env.attributes["issued_at_ms"] = str(
        issued_at_ms if issued_at_ms is not None else int(time.time() * 1000)
    )
    env.attributes["nonce"] = nonce or uuid.uuid4().hex
    env.attributes.update(extra)
    return env.SerializeToString()


def signed(ring: KeyRing, payload: bytes) -> dict[bytes, bytes]:
    return {b"payload": payload, b"signature": ring.sign(payload).encode(), b"kid": ring.kid.encode()}


def tampered(ring: KeyRing) -> dict[bytes, bytes]:
    fields = signed(ring, envelope())
    data = bytearray(fields[b"payload"])
    data[-1] ^= 0x01
    fields[b"payload"] = bytes(data)
    return fields


CASES: dict[str, Callable[[KeyRing], dict[bytes, bytes]]] = {
    "unsigned": lambda ring: {b"payload": envelope()},
    "bad_signature": tampered,
    "unknown_key": lambda ring: signed(KeyRing(b"someone-else-entirely"), envelope()),
    "wrong_key_no_kid": lambda ring: {
        b"payload": (p := envelope()),
        b"signature": KeyRing(b"someone-else-entirely").sign(p).encode(),
    },
    "malformed_envelope": lambda ring: signed(ring, b"\xff\xff\xff not protobuf"),
    "missing_payload": lambda ring: {b"hello": b"world"},
    "unexpected_type": lambda ring: signed(ring, envelope(message_type=pb.BUS_MESSAGE_TYPE_POLICY_UPDATE)),
    "stale": lambda ring: signed(ring, envelope(issued_at_ms=int(time.time() * 1000) - 600_000)),
    "future": lambda ring: signed(ring, envelope(issued_at_ms=int(time.time() * 1000) + 600_000)),
    "oversized": lambda ring: signed(ring, envelope(pad="x" * 5000)),
    "missing_nonce": lambda ring: signed(
        ring, pb.BusEnvelope(message_type=CMD, attributes={"issued_at_ms": "1"}).SerializeToString()
    ),
}
EXPECTED = {
    "unsigned": "unsigned",
    "bad_signature": "bad_signature",
    "unknown_key": "bad_signature",
    "wrong_key_no_kid": "bad_signature",
    "malformed_envelope": "malformed",
    "missing_payload": "malformed",
    "unexpected_type": "unexpected_type",
    "stale": "stale",
    "future": "future",
    "oversized": "oversized",
    "missing_nonce": "malformed",
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_rejection_reason_and_dead_letter_format(
    case: str, make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, keyring: KeyRing
) -> None:
    client = make_client(max_payload_bytes=4096, freshness_window_ms=60_000)
    await client.ensure_consumer_groups()
    fields = CASES[case](keyring)
    bad_id = (await redis_client.xadd(STREAM, fields)).decode()  # type: ignore[arg-type]
    good = Recorder(1)
    consumer = client.consumer(STREAM, good, types={CMD})
    async with running(consumer):
        [letter] = await dead_letters(redis_client, 1)
        assert (await client.publish_command(pb.AdaptationCommand(command_id="after"))).ok
        await good.wait()
    reason = EXPECTED[case]
    assert letter[b"reason"] == reason.encode()
    assert letter[b"source_stream"] == STREAM.encode()
    assert letter[b"source_id"] == bad_id.encode()
    for name in (b"payload", b"signature", b"kid"):
        assert letter.get(name) == fields.get(name)
    assert b"detail" in letter
    assert keyring.primary.secret not in letter[b"detail"]
    assert good.messages[0].decode(pb.AdaptationCommand).command_id == "after"
    snap = client.metrics_snapshot()
    assert snap[f"rejected.{STREAM}.{reason}"] == 1
    assert snap["deadletter.total"] == 1
    pending = await redis_client.xpending(STREAM, "test")
    assert pending["pending"] == 0  # the rejected entry was acked, not left in the PEL


async def test_replay_is_caught_across_two_consumers_of_one_group(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    first = make_client(consumer="replica-a")
    second = make_client(consumer="replica-b")
    await first.ensure_consumer_groups()
    handled_a, handled_b = Recorder(1), Recorder(1)
    await first.publish_command(pb.AdaptationCommand(command_id="once"))
    consumer_a = first.consumer(STREAM, handled_a, types={CMD})
    async with running(consumer_a):
        await handled_a.wait()
    # An attacker re-adds the exact signed entry; only replica b is reading now.
    [(_id, fields)] = await redis_client.xrange(STREAM)
    replay_id = (await redis_client.xadd(STREAM, fields)).decode()  # type: ignore[arg-type]
    consumer_b = second.consumer(STREAM, handled_b, types={CMD})
    async with running(consumer_b):
        [letter] = await dead_letters(redis_client, 1)
    assert letter[b"reason"] == b"replay"
    assert letter[b"source_id"] == replay_id.encode()
    assert handled_b.messages == []


async def test_handler_failure_retries_with_attempts_then_dead_letters(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(retry_max_attempts=4, retry_backoff_ms=1)
    await client.ensure_consumer_groups()
    attempts: list[int] = []
    nonces: set[str] = set()

    async def failing(message: OonaMessage) -> None:
        attempts.append(message.attempt)
        nonces.add(message.attributes["nonce"])
        raise RuntimeError("secret-looking text must not reach the dead letter")

    await client.publish_command(pb.AdaptationCommand(command_id="doomed"))
    consumer = client.consumer(STREAM, failing, types={CMD})
    async with running(consumer):
        [letter] = await dead_letters(redis_client, 1)
    assert attempts == [1, 2, 3, 4]
    assert len(nonces) == 4  # every retry is a freshly signed copy
    assert letter[b"reason"] == b"handler_failed"
    assert b"RuntimeError" in letter[b"detail"]
    assert b"secret-looking" not in letter[b"detail"]
    env = pb.BusEnvelope.FromString(letter[b"payload"])
    assert env.attributes["attempt"] == "4"
    assert pb.AdaptationCommand.FromString(env.payload).command_id == "doomed"
    snap = client.metrics_snapshot()
    assert snap[f"retries.{STREAM}"] == 3
    assert snap["deadletter.handler_failed"] == 1
    assert client.consume_breaker.state == pb.CIRCUIT_STATE_CLOSED  # handler bugs are not Redis failures
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED
    assert (await redis_client.xpending(STREAM, "test"))["pending"] == 0


async def test_handler_that_recovers_is_acked_once(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    seen: list[int] = []
    done = asyncio.Event()

    async def flaky(message: OonaMessage) -> None:
        seen.append(message.attempt)
        if message.attempt < 2:
            raise ValueError("first time fails")
        done.set()

    await client.publish_command(pb.AdaptationCommand())
    async with running(client.consumer(STREAM, flaky, types={CMD})):
        await asyncio.wait_for(done.wait(), 10)
    assert seen == [1, 2]
    assert await redis_client.xlen("oona.deadletter") == 0
    assert (await redis_client.xpending(STREAM, "test"))["pending"] == 0


async def test_concurrent_handlers_are_bounded(make_client: Callable[..., OonaClient]) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    active = 0
    peak = 0
    finished = Recorder(12)

    async def slow(message: OonaMessage) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        await finished(message)

    for _ in range(12):
        await client.publish_command(pb.AdaptationCommand())
    async with running(client.consumer(STREAM, slow, types={CMD}, concurrency=3, batch=12)):
        await finished.wait()
    assert peak == 3
