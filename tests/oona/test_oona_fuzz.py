"""Hostile stream contents never crash or stall a subscription, and never hide a good message."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oona_helpers import CMD, NORMAL, Recorder, command, dead_letters, envelope_bytes, pending, signed

from esper.core.worker import running
from esper.oona import OonaClient, envelope
from esper.security.signing import KeyRing

names = st.one_of(st.sampled_from([b"payload", b"signature", b"kid"]), st.binary(min_size=1, max_size=12))
values = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"\x00", b"\xff" * 40, envelope_bytes(), b"A" * 44, b"%%%="]),
)
hostile = st.dictionaries(names, values, min_size=1, max_size=5)
# Correctly signed envelopes with hostile attributes (only the signature is right).
signed_junk = st.builds(
    lambda issued, nonce, kind: envelope_bytes(issued_at_ms=issued, nonce=nonce, message_type=kind),
    issued=st.one_of(st.integers(min_value=-(2**40), max_value=2**60), st.just(0)),
    nonce=st.text(min_size=1, max_size=200),
    kind=st.integers(min_value=0, max_value=40),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(hostile, min_size=1, max_size=6), junk=st.lists(signed_junk, max_size=3))
async def test_garbage_is_dead_lettered_and_good_messages_still_flow(
    garbage: list[dict[bytes, bytes]],
    junk: list[bytes],
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    keyring: KeyRing,
) -> None:
    await redis_client.flushdb()
    client = make_client()
    good = Recorder(1)
    sub = client.subscribe(NORMAL, "g", good, types={CMD}, policy=None)
    entries = garbage + [signed(keyring, payload) for payload in junk]
    async with running(sub.run, "g"):
        ids = [(await redis_client.xadd(NORMAL, fields)).decode() for fields in entries]  # type: ignore[arg-type]
        # Fresh, well-formed junk of the right type is legitimately handled, not dead-lettered.
        letters = await dead_letters(redis_client, len(entries) - _acceptable(junk))
        assert (await client.publish_command(command("good"))).ok
        good.expect(_acceptable(junk) + 1)
        await good.wait()
    assert good.ids[-1] == "good"
    sent = dict(zip(ids, entries, strict=True))
    for letter in letters:
        fields = sent[letter[b"source_id"].decode()]
        assert letter[b"reason"] in {
            b"unsigned",
            b"bad_signature",
            b"malformed",
            b"oversized",
            b"stale",
            b"future",
            b"unexpected_type",
            b"replay",
        }
        for name in (b"payload", b"signature", b"kid"):
            if name in letter:
                assert letter[name] == fields[name]
    assert await pending(redis_client, NORMAL, "g") == 0


def _acceptable(junk: list[bytes]) -> int:
    """How many of the signed envelopes pass every check (the right type, fresh, a new nonce)."""
    ring = KeyRing(b"x" * 32)
    now = envelope.now_ms()
    keys = set()
    for payload in junk:
        outcome = envelope.verify_entry(
            ring,
            NORMAL,
            "1-0",
            signed(ring, payload),
            expected_types=frozenset({CMD}),
            now=now,
            freshness_window_ms=60_000,
            max_payload_bytes=1 << 20,
        )
        if isinstance(outcome, envelope.Accepted):
            keys.add(outcome.replay_key)
    return len(keys)
