"""Publishing: wire format, signing, routing per message, the hard cap, backpressure, metrics."""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, SECRET, Recorder, command

from esper.core.settings import EsperSettings
from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import DeliveryPolicy, OonaClient, StreamConfig
from esper.oona.wire_guard import MAX_ITEMS


def test_client_refuses_to_exist_without_a_keyring(redis_url: str) -> None:
    with pytest.raises(TypeError, match="KeyRing"):
        OonaClient(redis_url, StreamConfig(instance="x"), None)  # type: ignore[arg-type]


def test_stream_config_from_settings() -> None:
    settings = EsperSettings(
        oona_normal_stream="x.normal", kernel_freshness_window_ms=5000, oona_claim_idle_ms=7000
    )
    config = StreamConfig.from_settings(settings, instance="weatherlight-3")
    assert config.instance == config.source == "weatherlight-3"
    assert config.normal_stream == "x.normal"
    assert config.freshness_window_ms == 5000
    assert config.delivery.claim_idle_ms == 7000
    assert len(config.streams) == 8
    assert config.streams[-1] == "oona.deadletter"
    assert config.socket_timeout_s > config.block_ms / 1000
    with pytest.raises(ValueError, match="block_ms"):
        StreamConfig(instance="x", block_ms=0)
    # Limits the commit script reads as whole numbers are refused when built by hand, not at the
    # first commit.
    for bad in ({"hard_cap": -1}, {"max_stream_length": 0}, {"dead_letter_max_length": 2.5}):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            StreamConfig(instance="x", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clock_skew_ms"):
        StreamConfig(instance="x", clock_skew_ms=-1)
    # A short claim time brings the retry backoff down with it (a backing-off entry must not
    # look abandoned); a policy built by hand that breaks this is refused.
    quick = StreamConfig.from_settings(EsperSettings(oona_claim_idle_ms=3000), instance="w").delivery
    assert quick.retry_backoff_max_ms < quick.claim_idle_ms == 3000
    with pytest.raises(ValueError, match="below claim_idle_ms"):
        DeliveryPolicy(claim_idle_ms=1000)


def test_a_read_may_not_ask_for_more_entries_than_a_reply_may_hold(
    make_client: Callable[..., OonaClient],
) -> None:
    # The wire guard discards any reply array longer than MAX_ITEMS as hostile, so a batch that
    # large would never be read at all: refused when configured instead.
    DeliveryPolicy(batch=MAX_ITEMS, claim_batch=MAX_ITEMS)
    for too_many in ({"batch": MAX_ITEMS + 1}, {"claim_batch": MAX_ITEMS + 1}):
        with pytest.raises(ValueError, match="must be <= 1024"):
            DeliveryPolicy(**too_many)
    client = make_client()
    client.broadcast(NORMAL, Recorder(), types={CMD}, batch=MAX_ITEMS)
    for bad in (0, MAX_ITEMS + 1):
        with pytest.raises(ValueError, match="batch must be between 1 and 1024"):
            client.broadcast(NORMAL, Recorder(), types={CMD}, batch=bad)


def test_a_subscription_refuses_names_the_commit_cannot_carry(make_client: Callable[..., OonaClient]) -> None:
    # The commit sends the subscription's names on one line each (fewer arguments per commit).
    client = make_client()
    client.subscribe(NORMAL, "fine", Recorder(), types={CMD})
    with pytest.raises(ValueError, match="newline"):
        client.subscribe(NORMAL, "two\nlines", Recorder(), types={CMD})


async def test_entry_is_signed_v1_compatible_with_attributes(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(source="unit")
    result = await client.publish_command(command("cmd-1"))
    assert result.ok
    assert result.stream == NORMAL
    [(entry_id, fields)] = await redis_client.xrange(NORMAL)
    assert result.entry_id == entry_id.decode()
    assert set(fields) == {b"payload", b"signature", b"kid"}
    expected = base64.b64encode(hmac.digest(SECRET, fields[b"payload"], hashlib.sha256))
    assert fields[b"signature"] == expected  # exactly what a v1 peer computes
    assert fields[b"kid"] == client.keyring.kid.encode()
    envelope = pb.BusEnvelope.FromString(fields[b"payload"])
    assert envelope.message_type == CMD
    attrs = dict(envelope.attributes)
    assert set(attrs) == {"issued_at_ms", "nonce", "source"}
    assert attrs["source"] == "unit"
    assert uuid.UUID(hex=attrs["nonce"]).version == 4
    assert pb.AdaptationCommand.FromString(envelope.payload).command_id == "cmd-1"
    second = await client.publish_command(command("cmd-1"))
    [_first, (_id, again)] = await redis_client.xrange(NORMAL)
    assert second.ok
    assert pb.BusEnvelope.FromString(again[b"payload"]).attributes["nonce"] != attrs["nonce"]


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
        await client.publish_command(command("c")),
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
        "oona.normal",
    ]
    assert all(r.ok for r in results)
    types = [
        pb.BusEnvelope.FromString(f[b"payload"]).message_type
        for _id, f in await redis_client.xrange("oona.kernels.ready")
    ]
    assert types == [pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY, pb.BUS_MESSAGE_TYPE_KERNEL_CATALOG_UPDATE]


async def test_priority_routes_one_message_and_is_not_sticky(make_client: Callable[..., OonaClient]) -> None:
    client = make_client()
    high = await client.publish_telemetry(pb.TelemetryPacket(), priority=pb.MESSAGE_PRIORITY_CRITICAL)
    normal = await client.publish_telemetry(pb.TelemetryPacket(), priority=pb.MESSAGE_PRIORITY_NORMAL)
    urgent_state = await client.publish(
        pb.BUS_MESSAGE_TYPE_SYSTEM_STATE, pb.SystemStatePacket(), priority=pb.MESSAGE_PRIORITY_HIGH
    )
    plain = await client.publish_telemetry(pb.TelemetryPacket())
    assert [high.stream, normal.stream, urgent_state.stream, plain.stream] == [
        "oona.emergency",
        "oona.telemetry",
        "oona.emergency",
        "oona.telemetry",
    ]
    with pytest.raises(ValueError, match="no stream"):
        await client.publish(pb.BUS_MESSAGE_TYPE_UNSPECIFIED, b"")


async def test_publish_refuses_oversized_and_caps_the_stream(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client(max_payload_bytes=2048, hard_cap=100)
    refused = await client.publish_command(command("x" * 4000))
    assert (refused.ok, refused.reason, refused.entry_id) == (False, "oversized", None)
    assert await redis_client.exists(NORMAL) == 0
    for i in range(1000):
        assert (await client.publish_command(command(f"{i}"))).ok
    # Approximate MAXLEN: whole nodes are cut, so the stream stays near the cap, never near 1000.
    assert 100 <= await redis_client.xlen(NORMAL) < 300
    assert client.metrics_snapshot()["publish_failed.oona.normal.oversized"] == 1


async def test_backpressure_uses_pending_depth_of_any_group(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    stream = "oona.kernels.requests"
    client = make_client(backpressure={stream: 2}, depth_refresh_ms=0)
    for i in range(2):
        assert (await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id=f"{i}"))).ok
    await redis_client.xgroup_create(stream, "fast", id="0")
    await redis_client.xgroup_create(stream, "slow", id="0")
    await redis_client.xreadgroup("fast", "f", {stream: ">"}, count=10)
    ids = [eid for eid, _ in await redis_client.xrange(stream)]
    await redis_client.xack(stream, "fast", *ids)
    # "fast" holds nothing, "slow" has read nothing: no pending depth yet, publishing goes on.
    assert (await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="2"))).ok
    await redis_client.xreadgroup("slow", "s", {stream: ">"}, count=10)  # 3 pending in "slow"
    refused = await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="x"))
    assert (refused.ok, refused.reason, refused.entry_id) == (False, "backpressure", None)
    assert client.metrics_snapshot()[f"backpressure.{stream}"] == 1
    assert client.publish_breaker.state == pb.CIRCUIT_STATE_CLOSED  # a refusal is not a failure
    assert (await client.publish_command(command("other stream"))).ok
    await redis_client.xack(stream, "slow", *[eid for eid, _ in await redis_client.xrange(stream)])
    assert (await client.publish_kernel_prefetch_request(pb.KernelPrefetchRequest(request_id="y"))).ok


async def test_metrics_snapshot_histograms_and_packet(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    recorder = Recorder(1)
    sub = client.subscribe(NORMAL, "g", recorder, types={CMD})
    async with running(sub.run, "sub"):
        await client.publish_command(command("m"))
        await recorder.wait()
    report = await client.housekeeping()
    assert report.pending[NORMAL] == {"g": 0}
    snap = client.metrics_snapshot()
    assert snap["published.oona.normal"] == 1
    assert snap["consumed.oona.normal"] == 1
    assert snap["publish_latency_ms.count"] == 1
    assert snap["pending.oona.normal.g"] == 0
    packet = client.metrics_packet()
    names = {m.name for m in packet.metrics}
    assert packet.source_subsystem == "oona"
    assert {"oona.deadletter.total", "oona.published.oona.normal", "oona.trimmed_unread.total"} <= names
    registry = client.metrics.registry
    assert registry.get_sample_value("oona_publish_latency_seconds_count", {"stream": NORMAL}) == 1
    assert registry.get_sample_value("oona_handler_latency_seconds_count", {"stream": NORMAL}) == 1


def test_read_budget_must_hold_two_payloads_and_framing() -> None:
    with pytest.raises(ValueError, match="two payloads"):
        StreamConfig(instance="x", max_payload_bytes=2048, max_read_bytes=8192)
