"""esper-lite v1 peers (payload/signature only, no attributes) and broadcast readers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import SECRET, Recorder, dead_letters, running

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient

REQ = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_REQUEST
READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY
CATALOG = pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE


def v1_request(request_id: str, issued_at_s: float) -> dict[bytes, bytes]:
    """Exactly what an esper-lite v1 peer XADDs: no kid, no envelope attributes."""
    request = pb.KernelPrefetchRequest(request_id=request_id, blueprint_id="bp")
    request.issued_at.FromMilliseconds(int(issued_at_s * 1000))
    payload = pb.BusEnvelope(message_type=REQ, payload=request.SerializeToString()).SerializeToString()
    signature = base64.b64encode(hmac.new(SECRET, payload, hashlib.sha256).digest())
    return {b"payload": payload, b"signature": signature}


async def test_v1_peer_request_accepted_stale_and_replay_rejected(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    stream = "oona.kernels.requests"
    now = time.time()
    await redis_client.xadd(stream, v1_request("r-1", now))  # type: ignore[arg-type]
    await redis_client.xadd(stream, v1_request("r-1", now))  # type: ignore[arg-type]  # replay by request_id
    await redis_client.xadd(stream, v1_request("r-old", now - 3600))  # type: ignore[arg-type]
    recorder = Recorder(1)
    async with running(client.consumer(stream, recorder, types={REQ})):
        letters = await dead_letters(redis_client, 2)
        await recorder.wait()
    assert recorder.messages[0].decode(pb.KernelPrefetchRequest).request_id == "r-1"
    assert recorder.messages[0].kid is None
    assert sorted(letter[b"reason"] for letter in letters) == [b"replay", b"stale"]
    assert all(b"kid" not in letter for letter in letters)


async def test_v1_peer_can_verify_our_reply(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    await client.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="r-1", checksum="abc"))
    [(_id, fields)] = await redis_client.xrange("oona.kernels.ready")
    # v1 reads only payload and signature, ignoring unknown fields and attributes.
    expected = base64.b64encode(hmac.new(SECRET, fields[b"payload"], hashlib.sha256).digest())
    assert hmac.compare_digest(fields[b"signature"], expected)
    envelope = pb.BusEnvelope.FromString(fields[b"payload"])
    assert envelope.message_type == READY
    assert pb.KernelArtifactReady.FromString(envelope.payload).request_id == "r-1"


async def test_broadcast_readers_each_see_every_entry(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    publisher = make_client(consumer="urza")
    trainers = [make_client(consumer=f"trainer-{i}") for i in range(2)]
    recorders = [Recorder(2) for _ in trainers]
    readers = [
        t.broadcast("oona.kernels.ready", r, types={READY, CATALOG})
        for t, r in zip(trainers, recorders, strict=True)
    ]
    await publisher.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="before-start"))
    async with running(*readers):
        await asyncio.wait_for(asyncio.gather(*(r.ready.wait() for r in readers)), 5)
        await publisher.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="a"))
        await publisher.publish_kernel_catalog_update(pb.KernelCatalogUpdate(blueprint_id="bp"))
        # A replayed copy of the ready message is seen by both readers but handled by neither.
        _id, fields = (await redis_client.xrevrange("oona.kernels.ready", count=2))[1]
        await redis_client.xadd("oona.kernels.ready", fields)  # type: ignore[arg-type]
        await asyncio.gather(*(r.wait() for r in recorders))
        for recorder in recorders:
            recorder.expected, recorder.done = 3, asyncio.Event()
        await publisher.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="b"))
        await asyncio.gather(*(r.wait() for r in recorders))
    for recorder in recorders:
        kinds = [m.message_type for m in recorder.messages]
        assert kinds == [READY, CATALOG, READY]
    assert trainers[0].metrics_snapshot()["rejected.oona.kernels.ready.replay"] == 1
    assert await redis_client.xlen("oona.deadletter") == 0  # broadcast readers never dead-letter
