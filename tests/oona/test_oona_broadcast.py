"""Broadcast readers: every reader sees every good entry; hostile entries are refused and counted."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, REPORT, SECRET, STATE, Recorder, command, envelope_bytes, signed

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient
from esper.oona.envelope import peek_message_type
from esper.security.signing import KeyRing

FORGER = KeyRing(b"not-the-platform-key-0123456789ab")


def test_peeked_type_matches_the_serialized_envelope_for_every_type() -> None:
    for value in pb.BusMessageType.values():
        payload = envelope_bytes(message_type=value, body=b"x" * 300)
        expected = value if value != 0 else None  # proto3 leaves an unset enum out entirely
        assert peek_message_type(payload) == expected, pb.BusMessageType.Name(value)
    assert peek_message_type(b"") is None
    assert peek_message_type(b"\x08") is None
    assert peek_message_type(b"\x08\x80") is None  # a varint cut short
    assert peek_message_type(b"\x08\x80\x80\x01") is None  # longer than any type we define
    assert peek_message_type(b"\x12\x00") is None  # field 2 first: not what we sign


async def test_two_readers_see_every_good_entry_and_refuse_the_hostile_ones(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    publisher = make_client(instance="pub-0")
    first, second = Recorder(2), Recorder(2)
    readers = [
        make_client(instance=name).broadcast(
            NORMAL, recorder, types={CMD}, ignore_types={REPORT}, start_id="0-0"
        )
        for name, recorder in (("a-0", first), ("b-0", second))
    ]
    await publisher.publish_command(command("before"))
    good = signed(KeyRing(SECRET), envelope_bytes(message_type=CMD))
    await redis_client.xadd(NORMAL, good)  # type: ignore[arg-type]
    await redis_client.xadd(NORMAL, good)  # type: ignore[arg-type]  # the same entry again: a replay
    await redis_client.xadd(NORMAL, signed(FORGER, envelope_bytes(message_type=CMD)))  # type: ignore[arg-type]
    await redis_client.xadd(NORMAL, signed(FORGER, envelope_bytes(message_type=REPORT)))  # type: ignore[arg-type]
    await redis_client.xadd(NORMAL, signed(FORGER, envelope_bytes(message_type=STATE)))  # type: ignore[arg-type]
    await publisher.publish_command(command("after"))
    first.expect(3)
    second.expect(3)
    async with running(readers[0].run, "a"), running(readers[1].run, "b"):
        await first.wait()
        await second.wait()
    for reader, recorder in zip(readers, (first, second), strict=True):
        assert recorder.ids == ["before", "x", "after"]  # the good raw entry once, in stream order
        snapshot = reader.link.metrics.snapshot()
        assert snapshot[f"rejected.{NORMAL}.replay"] == 1
        # The forged command and the forged unexpected type are judged; the forged ignored type is skipped.
        assert snapshot[f"rejected.{NORMAL}.bad_signature"] == 2
        assert snapshot[f"ignored.{NORMAL}"] == 1
