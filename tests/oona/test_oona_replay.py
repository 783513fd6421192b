"""Replays: copies of signed entries, delete-and-re-add at the original id, esper-lite v1 peers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import (
    CMD,
    NORMAL,
    SECRET,
    STATE,
    Recorder,
    command,
    dead_letters,
    now_ms,
    pending,
    reasons,
)

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, Reply

TELEMETRY = pb.BUS_MESSAGE_TYPE_TELEMETRY
REQ = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST


def v1_entry(message_type: int, body: bytes) -> dict[bytes, bytes]:
    """Exactly what an esper-lite v1 peer XADDs: no kid, no envelope attributes."""
    payload = pb.BusEnvelope(message_type=message_type, payload=body).SerializeToString()
    signature = base64.b64encode(hmac.new(SECRET, payload, hashlib.sha256).digest())
    return {b"payload": payload, b"signature": signature}


def v1_telemetry(at_ms: int, source: str = "tolaria") -> dict[bytes, bytes]:
    packet = pb.TelemetryPacket(packet_id=f"p-{at_ms}", source_subsystem=source)
    packet.timestamp.FromMilliseconds(at_ms)
    return v1_entry(TELEMETRY, packet.SerializeToString())


def v1_state(at_ms: int) -> dict[bytes, bytes]:
    return v1_entry(
        STATE, pb.SystemStatePacket(version=1, timestamp_ns=at_ms * 1_000_000).SerializeToString()
    )


async def test_a_copy_is_caught_by_another_replica_of_the_group_and_by_every_group(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    """Group a's handler replies; a copy read by a fresh replica of a never publishes a second reply."""
    first, second = make_client(instance="r-0"), make_client(instance="r-1")
    handled = {"a": Recorder(1), "b": Recorder(1)}

    async def a_replies(message: OonaMessage) -> list[Reply]:
        await handled["a"](message)
        return [Reply(TELEMETRY, pb.TelemetryPacket(packet_id=message.entry_id))]

    subs = [
        first.subscribe(NORMAL, "a", a_replies, types={CMD}),
        first.subscribe(NORMAL, "b", handled["b"], types={CMD}),
    ]
    async with running(subs[0].run, "a"), running(subs[1].run, "b"):
        await first.publish_command(command("once"))
        await asyncio.gather(*(r.wait() for r in handled.values()))
    [(_id, fields)] = await redis_client.xrange(NORMAL)
    copy_id = (await redis_client.xadd(NORMAL, fields)).decode()  # type: ignore[arg-type]
    # Only another replica is reading group "a" now; group "b" is read by the replica that handled it.
    replica = second.subscribe(NORMAL, "a", a_replies, types={CMD})
    async with running(replica.run, "a"), running(subs[1].run, "b"):
        letters = await dead_letters(redis_client, 2)
    assert reasons(letters) == ["replay", "replay"]
    assert {letter[b"source_id"] for letter in letters} == {copy_id.encode()}
    assert {letter[b"group"] for letter in letters} == {b"a", b"b"}
    # The replica that committed the original remembers it: its handler never saw the copy.
    assert len(handled["b"].messages) == 1
    # The fresh replica may run its handler, but the claim that commits with the ack refused the
    # copy: its reply was dropped, so there is exactly one reply on the bus.
    assert await redis_client.xlen("oona.telemetry") == 1
    assert second.metrics_snapshot()[f"rejected.{NORMAL}.replay"] == 1


async def test_delete_and_re_add_at_the_original_id_is_a_replay(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    handled = {"a": Recorder(1), "b": Recorder(1)}
    subs = [client.subscribe(NORMAL, g, r, types={CMD}) for g, r in handled.items()]
    async with running(subs[0].run, "a"), running(subs[1].run, "b"):
        original = await client.publish_command(command("once"))
        await asyncio.gather(*(r.wait() for r in handled.values()))
        [(_id, fields)] = await redis_client.xrange(NORMAL)
        # Whoever can write to Redis deletes the stream (and so its groups) and re-adds the
        # captured entry at its original id, so it looks like the very same entry.
        await redis_client.delete(NORMAL)
        await redis_client.xadd(NORMAL, fields, id=original.entry_id)  # type: ignore[arg-type]
        letters = await dead_letters(redis_client, 2)
    assert reasons(letters) == ["replay", "replay"]
    assert {letter[b"source_id"] for letter in letters} == {original.entry_id.encode()}  # type: ignore[union-attr]
    assert [len(r.messages) for r in handled.values()] == [1, 1]
    assert await pending(redis_client, NORMAL, "a") == await pending(redis_client, NORMAL, "b") == 0


async def test_a_copy_after_its_replay_key_was_deleted_is_stale_once_out_of_the_window(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    window_ms = 1_000
    client = make_client(freshness_window_ms=window_ms)
    handled = Recorder(1)
    sub = client.subscribe(NORMAL, "a", handled, types={CMD})
    async with running(sub.run, "a"):
        await client.publish_command(command("once"))
        await handled.wait()
        [(_id, fields)] = await redis_client.xrange(NORMAL)
        issued = int(pb.BusEnvelope.FromString(fields[b"payload"]).attributes["issued_at_ms"])
        keys = [key async for key in redis_client.scan_iter(match="oona:replay:*")]
        assert len(keys) == 1
        await redis_client.delete(*keys)
        # This test is about time: the copy is re-added once its signed time is out of the window.
        await asyncio.sleep(max(0.0, (issued + window_ms + 50 - now_ms()) / 1000))
        await redis_client.xadd(NORMAL, fields)  # type: ignore[arg-type]
        [letter] = await dead_letters(redis_client, 1)
    assert letter[b"reason"] == b"stale"
    assert len(handled.messages) == 1


async def test_v1_telemetry_and_state_are_judged_by_their_own_timestamp(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    telemetry, states = Recorder(2), Recorder(1)
    subs = [
        client.subscribe("oona.telemetry", "nissa", telemetry, types={TELEMETRY}),
        client.subscribe(NORMAL, "tamiyo", states, types={STATE}, ignore_types={CMD}),
    ]
    now = now_ms()
    fresh_a, fresh_b = v1_telemetry(now, "a"), v1_telemetry(now, "b")
    state = v1_state(now)
    async with running(subs[0].run, "t"), running(subs[1].run, "s"):
        for fields in (fresh_a, fresh_b, fresh_a, v1_telemetry(now - 600_000), v1_telemetry(now + 600_000)):
            await redis_client.xadd("oona.telemetry", fields)  # type: ignore[arg-type]
        for fields in (state, state, v1_state(now - 600_000)):
            await redis_client.xadd(NORMAL, fields)  # type: ignore[arg-type]
        letters = await dead_letters(redis_client, 5)
        await telemetry.wait()
        await states.wait()
    by_stream = {
        stream: reasons([x for x in letters if x[b"source_stream"] == stream.encode()])
        for stream in ("oona.telemetry", NORMAL)
    }
    assert by_stream == {"oona.telemetry": ["future", "replay", "stale"], NORMAL: ["replay", "stale"]}
    assert [m.decode(pb.TelemetryPacket).source_subsystem for m in telemetry.messages] == ["a", "b"]
    assert all(m.kid is None and not m.attributes for m in telemetry.messages + states.messages)
    assert len(states.messages) == 1


async def test_v1_kernel_request_replay_key_is_its_request_id(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    handled = Recorder(1)
    sub = client.subscribe("oona.kernels.requests", "urza", handled, types={REQ})

    def request(at_ms: int) -> dict[bytes, bytes]:
        message = pb.KernelPrefetchRequest(request_id="r-1", blueprint_id="bp")
        message.issued_at.FromMilliseconds(at_ms)
        return v1_entry(REQ, message.SerializeToString())

    async with running(sub.run, "urza"):
        now = now_ms()
        await redis_client.xadd("oona.kernels.requests", request(now))  # type: ignore[arg-type]
        await redis_client.xadd("oona.kernels.requests", request(now + 1))  # type: ignore[arg-type]
        [letter] = await dead_letters(redis_client, 1)
        await handled.wait()
    assert letter[b"reason"] == b"replay"
    assert handled.messages[0].decode(pb.KernelPrefetchRequest).request_id == "r-1"


async def test_a_v1_peer_can_verify_our_entries(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="r-1", checksum="abc"))
    [(_id, fields)] = await redis_client.xrange("oona.kernels.ready")
    expected = base64.b64encode(hmac.new(SECRET, fields[b"payload"], hashlib.sha256).digest())
    assert hmac.compare_digest(fields[b"signature"], expected)
    envelope = pb.BusEnvelope.FromString(fields[b"payload"])
    assert envelope.message_type == pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
    assert pb.KernelArtifactReady.FromString(envelope.payload).request_id == "r-1"
