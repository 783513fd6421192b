"""Publishing: wire format, signing, routing, backpressure, group creation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import SECRET, Recorder, running

from esper.core.settings import EsperSettings
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, StreamConfig

ALL_STREAMS = {
    "oona.normal",
    "oona.emergency",
    "oona.telemetry",
    "oona.policy",
    "oona.kernels.requests",
    "oona.kernels.ready",
    "oona.kernels.errors",
    "oona.deadletter",
}


def test_client_refuses_to_exist_without_a_keyring(redis_url: str) -> None:
    with pytest.raises(TypeError, match="KeyRing"):
        OonaClient(redis_url, StreamConfig(group="g", consumer="c"), None)  # type: ignore[arg-type]


def test_stream_config_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OONA_CONSUMER_NAME", raising=False)
    settings = EsperSettings(oona_normal_stream="x.normal", kernel_freshness_window_ms=5000)
    config = StreamConfig.from_settings(settings, group="weatherlight")
    assert config.group == "weatherlight"
    assert config.normal_stream == "x.normal"
    assert config.freshness_window_ms == 5000
    assert config.consumer.startswith("weatherlight-")
    assert config.consumer.endswith(str(__import__("os").getpid()))
    assert len(config.streams) == 8
    assert config.socket_timeout_s > config.block_ms / 1000


async def test_entry_is_signed_v1_compatible_with_attributes(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(source="unit")
    result = await client.publish_command(pb.AdaptationCommand(command_id="cmd-1"))
    assert result.ok
    assert result.stream == "oona.normal"
    assert result.entry_id
    [(entry_id, fields)] = await redis_client.xrange("oona.normal")
    assert set(fields) == {b"payload", b"signature", b"kid"}
    expected = base64.b64encode(hmac.digest(SECRET, fields[b"payload"], hashlib.sha256))
    assert fields[b"signature"] == expected
    envelope = pb.BusEnvelope.FromString(fields[b"payload"])
    assert envelope.message_type == pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
    attrs = dict(envelope.attributes)
    assert set(attrs) == {"issued_at_ms", "nonce", "source"}
    assert attrs["source"] == "unit"
    assert uuid.UUID(hex=attrs["nonce"]).version == 4
    assert abs(int(attrs["issued_at_ms"]) - int(entry_id.split(b"-")[0])) < 5000
    assert pb.AdaptationCommand.FromString(envelope.payload).command_id == "cmd-1"


async def test_each_publisher_targets_its_stream(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    results = [
        await client.publish_state(pb.SystemStatePacket()),
        await client.publish_state(pb.SystemStatePacket(), emergency=True),
        await client.publish_field_report(pb.FieldReport()),
        await client.publish_telemetry(pb.TelemetryPacket()),
        await client.publish_policy_update(pb.PolicyUpdate()),
        await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="r")),
        await client.publish_kernel_artifact_ready(pb.KernelArtifactReady(request_id="r")),
        await client.publish_kernel_artifact_error(pb.KernelArtifactError(request_id="r")),
        await client.publish_kernel_catalog_update(pb.KernelCatalogUpdate(blueprint_id="b")),
    ]
    assert [r.stream for r in results] == [
        "oona.normal",
        "oona.emergency",
        "oona.normal",
        "oona.telemetry",
        "oona.policy",
        "oona.kernels.requests",
        "oona.kernels.ready",
        "oona.kernels.errors",
        "oona.kernels.ready",
    ]
    assert all(r.ok for r in results)
    types = [
        pb.BusEnvelope.FromString(f[b"payload"]).message_type
        for _id, f in await redis_client.xrange("oona.kernels.ready")
    ]
    assert types == [pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE]


async def test_priority_routes_one_message_and_is_not_sticky(
    make_client: Callable[..., OonaClient],
) -> None:
    client = make_client()
    high = await client.publish_telemetry(pb.TelemetryPacket(), priority=pb.MESSAGE_PRIORITY_CRITICAL)
    normal = await client.publish_telemetry(pb.TelemetryPacket(), priority=pb.MESSAGE_PRIORITY_NORMAL)
    request = await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="r"))
    plain = await client.publish_telemetry(pb.TelemetryPacket())
    assert high.stream == "oona.emergency"
    assert normal.stream == "oona.telemetry"
    assert request.stream == "oona.kernels.requests"
    assert plain.stream == "oona.telemetry"


async def test_group_created_after_publish_still_delivers(make_client: Callable[..., OonaClient]) -> None:
    client = make_client()
    await client.publish_command(pb.AdaptationCommand(command_id="early"))
    await client.ensure_consumer_groups()
    await client.ensure_consumer_groups()  # BUSYGROUP is ignored
    infos = {s: await client.redis.xinfo_groups(s) for s in client.config.streams}
    assert set(infos) == ALL_STREAMS
    assert all(len(v) == 1 for v in infos.values())
    recorder = Recorder(1)
    consumer = client.consumer("oona.normal", recorder, types={pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND})
    async with running(consumer):
        await recorder.wait()
    assert recorder.messages[0].decode(pb.AdaptationCommand).command_id == "early"
    assert recorder.messages[0].attempt == 1


async def test_backpressure_uses_pending_depth_not_length(make_client: Callable[..., OonaClient]) -> None:
    client = make_client(backpressure={"oona.kernels.requests": 2}, depth_refresh_ms=0)
    await client.ensure_consumer_groups()
    stream = "oona.kernels.requests"
    for i in range(2):
        assert (await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id=f"{i}"))).ok
    # Deliver both without acking: pending = 2 reaches the threshold.
    await client.redis.xreadgroup("test", "c1", {stream: ">"}, count=10)
    refused = await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="x"))
    assert not refused.ok
    assert refused.reason == "backpressure"
    assert refused.entry_id is None
    assert client.metrics_snapshot()[f"backpressure.{stream}"] == 1
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED  # refusals are not failures
    # Other streams are unaffected; acking drains the depth even though XLEN stays 2.
    assert (await client.publish_command(pb.AdaptationCommand())).ok
    ids = [eid for eid, _ in await client.redis.xrange(stream)]
    await client.redis.xack(stream, "test", *ids)
    assert await client.redis.xlen(stream) == 2
    assert (await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="y"))).ok


async def test_metrics_snapshot_and_packet(make_client: Callable[..., OonaClient]) -> None:
    client = make_client()
    await client.ensure_consumer_groups()
    await client.publish_command(pb.AdaptationCommand())
    await client.refresh_depths()
    snap = client.metrics_snapshot()
    assert snap["published.oona.normal"] == 1
    assert snap["publish_latency_ms.count"] == 1
    assert snap["pending.oona.normal"] == 0
    packet = client.metrics_packet()
    names = {m.name for m in packet.metrics}
    assert packet.source_subsystem == "oona"
    assert all(name.startswith("oona.") for name in names)
    assert {
        "oona.deadletter.total",
        "oona.pending.oona.kernels.requests",
        "oona.published.oona.normal",
    } <= names
    histogram = client.metrics.registry.get_sample_value(
        "oona_publish_latency_seconds_count", {"stream": "oona.normal"}
    )
    assert histogram == 1
