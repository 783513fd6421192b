"""Two control-plane replicas on one bus, told apart by Nissa: every packet names its replica."""

from __future__ import annotations

from pathlib import Path

from _observability_support import (
    SECRET,
    label_values,
    nissa,
    replica_settings,
    series_of,
    weatherlight,
)
from weatherlight._service_support import status_of

from esper.core.telemetry import INSTANCE_INDICATOR, packet_instance, stamp_instance
from esper.leyline import leyline_pb2 as L
from esper.oona import OonaClient, StreamConfig
from esper.security import KeyRing

PUBLISHED = "esper_oona_published_oona_telemetry"


async def test_two_replicas_are_two_series_in_nissa(
    redis_url: str, tmp_path: Path, isolated_env: Path
) -> None:
    async with (
        nissa(redis_url) as live,
        weatherlight(replica_settings(tmp_path, redis_url, "a")) as first,
        weatherlight(replica_settings(tmp_path, redis_url, "b")) as second,
        OonaClient(redis_url, StreamConfig(instance="observer"), KeyRing(SECRET.encode())) as publisher,
    ):
        names = {first.instance, second.instance}
        assert len(names) == 2
        assert all(name and name.startswith("weatherlight-") for name in names)
        assert {(await status_of(s))["instance"] for s in (first, second)} == names

        # Kasmina's packets (from each replica's kernel warmer) and Tamiyo's (one replica decides).
        assert await publisher.publish_kernel_catalog_update(L.KernelCatalogUpdate(blueprint_id="BP404"))
        state = L.SystemStatePacket(version=1, current_epoch=1, training_run_id="run-i", validation_loss=0.7)
        assert await publisher.publish_state(state)

        def all_seen() -> bool:
            samples = live.samples()
            return (
                label_values(samples, "esper_weatherlight_uptime_s", "instance") == names
                and label_values(samples, PUBLISHED, "instance", source="oona") == names
                and label_values(samples, "esper_kasmina_warm_failures_total", "instance") == names
                and bool(series_of(samples, "esper_tamiyo_policy_version"))
            )

        await live.watch.until(all_seen, "both replicas' weatherlight, oona, kasmina and tamiyo packets")
        samples = live.samples()

        # One series per replica (never one series flipping between them), so sums add up.
        published = series_of(samples, PUBLISHED, source="oona")
        assert len(published) == 2
        assert all(value >= 1 for value in published.values())
        assert (
            label_values(samples, "esper_telemetry_packets_total", "instance", source="weatherlight") == names
        )
        assert label_values(samples, "esper_tamiyo_policy_version", "instance", source="tamiyo") <= names
        # The packets themselves name their replica (not only the envelope that carried them).
        stamped = await stamped_packets(publisher)
        assert {"weatherlight", "oona", "kasmina", "tamiyo"} <= {source for source, _, _ in stamped}
        assert all(instance == sender and instance in names for _, instance, sender in stamped)
        # The state packet's publisher is named by its signed envelope.
        assert label_values(samples, "esper_system_state_packets_total", "instance", run="run-i") == {
            "observer"
        }


async def stamped_packets(client: OonaClient) -> list[tuple[str, str, str]]:
    """(source, stamped instance, envelope source) of every telemetry packet on the bus so far."""
    found = []
    for stream in ("oona.telemetry", "oona.emergency"):
        for _entry_id, fields in await client.redis.xrange(stream):
            envelope = L.BusEnvelope()
            envelope.ParseFromString(fields[b"payload"])
            if envelope.message_type != L.BUS_MESSAGE_TYPE_TELEMETRY:
                continue
            packet = L.TelemetryPacket()
            packet.ParseFromString(envelope.payload)
            found.append((packet.source_subsystem, packet_instance(packet), envelope.attributes["source"]))
    return found


def test_packets_carry_the_instance_in_their_health_indicators() -> None:
    packet = L.TelemetryPacket(source_subsystem="oona")
    assert packet_instance(packet) == ""
    stamp_instance(packet, "weatherlight-3")
    assert packet.system_health.indicators[INSTANCE_INDICATOR] == "weatherlight-3"
    assert packet_instance(packet) == "weatherlight-3"
