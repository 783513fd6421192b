"""Hostile stream contents never crash or stall a consumer, and never hide a good message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oona_helpers import Recorder, dead_letters, running

from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient

CMD = pb.BUS_MESSAGE_TYPE_ADAPTATION_COMMAND
STREAM = "oona.normal"
field_names = st.one_of(
    st.sampled_from([b"payload", b"signature", b"kid"]), st.binary(min_size=1, max_size=12)
)
entries = st.lists(
    st.dictionaries(field_names, st.binary(max_size=300), min_size=1, max_size=4), min_size=1, max_size=6
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=entries)
async def test_garbage_is_dead_lettered_and_good_messages_still_flow(
    garbage: list[dict[bytes, bytes]],
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
) -> None:
    await redis_client.flushdb()
    client = make_client()
    await client.ensure_consumer_groups()
    good = Recorder(1)
    consumer = client.consumer(STREAM, good, types={CMD}, batch=4)
    async with running(consumer):
        ids = [(await redis_client.xadd(STREAM, fields)).decode() for fields in garbage]  # type: ignore[arg-type]
        letters = await dead_letters(redis_client, len(garbage))
        assert (await client.publish_command(pb.AdaptationCommand(command_id="good"))).ok
        await good.wait()
    assert [m.decode(pb.AdaptationCommand).command_id for m in good.messages] == ["good"]
    assert sorted(letter[b"source_id"].decode() for letter in letters) == sorted(ids)
    reasons = {letter[b"reason"] for letter in letters}
    assert reasons <= {b"unsigned", b"bad_signature", b"malformed", b"oversized"}
    sent = dict(zip(ids, garbage, strict=True))
    for letter in letters:
        fields = sent[letter[b"source_id"].decode()]
        for name in (b"payload", b"signature", b"kid"):
            assert letter.get(name) == fields.get(name)
    assert (await redis_client.xpending(STREAM, "test"))["pending"] == 0
    assert not asyncio.current_task().cancelled()  # type: ignore[union-attr]
