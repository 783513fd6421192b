"""Every rejection reason lands in the dead letter stream, once per group, in the documented format."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from oona_helpers import (
    CMD,
    NORMAL,
    Recorder,
    command,
    dead_letters,
    envelope_bytes,
    now_ms,
    pending,
    signed,
)

from esper.core.worker import running
from esper.leyline import leyline_pb2 as pb
from esper.oona import OonaClient, OonaMessage, RejectMessage
from esper.security.signing import KeyRing

OTHER = KeyRing(b"someone-else-entirely-0123456789")


def tampered(ring: KeyRing) -> dict[bytes, bytes]:
    fields = signed(ring, envelope_bytes())
    data = bytearray(fields[b"payload"])
    data[-1] ^= 0x01
    fields[b"payload"] = bytes(data)
    return fields


CASES: dict[str, tuple[str, Callable[[KeyRing], dict[bytes, bytes]]]] = {
    "unsigned": ("unsigned", lambda ring: {b"payload": envelope_bytes()}),
    "empty_signature": ("unsigned", lambda ring: {b"payload": envelope_bytes(), b"signature": b""}),
    "bad_signature": ("bad_signature", tampered),
    "unknown_kid": ("bad_signature", lambda ring: signed(OTHER, envelope_bytes())),
    "wrong_key_no_kid": ("bad_signature", lambda ring: signed(OTHER, envelope_bytes(), kid=False)),
    "garbage_signature": ("bad_signature", lambda ring: {b"payload": envelope_bytes(), b"signature": b"!!"}),
    "malformed_envelope": ("malformed", lambda ring: signed(ring, b"\xff\xff\xff not protobuf")),
    "missing_payload": ("malformed", lambda ring: {b"hello": b"world"}),
    "missing_nonce": (
        "malformed",
        lambda ring: signed(
            ring, pb.BusEnvelope(message_type=CMD, attributes={"issued_at_ms": "1"}).SerializeToString()
        ),
    ),
    "bad_issued_at": ("malformed", lambda ring: signed(ring, envelope_bytes(issued_at_ms=-5))),
    "long_nonce": ("malformed", lambda ring: signed(ring, envelope_bytes(nonce="n" * 200))),
    "v1_without_timestamp": (
        "stale",
        lambda ring: signed(ring, pb.BusEnvelope(message_type=CMD).SerializeToString(), kid=False),
    ),
    "unexpected_type": (
        "unexpected_type",
        lambda ring: signed(ring, envelope_bytes(message_type=pb.BUS_MESSAGE_TYPE_POLICY_UPDATE)),
    ),
    "stale": ("stale", lambda ring: signed(ring, envelope_bytes(issued_at_ms=now_ms() - 600_000))),
    "future": ("future", lambda ring: signed(ring, envelope_bytes(issued_at_ms=now_ms() + 600_000))),
    "oversized": ("oversized", lambda ring: signed(ring, envelope_bytes(pad="x" * 5000))),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_rejection_reason_and_dead_letter_format(
    case: str, make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, keyring: KeyRing
) -> None:
    client = make_client(max_payload_bytes=4096)
    reason, build = CASES[case]
    fields = build(keyring)
    recorders = {"a": Recorder(1), "b": Recorder(1)}
    subs = [client.subscribe(NORMAL, g, r, types={CMD}) for g, r in recorders.items()]
    async with running(subs[0].run, "a"), running(subs[1].run, "b"):
        bad_id = (await redis_client.xadd(NORMAL, fields)).decode()  # type: ignore[arg-type]
        letters = await dead_letters(redis_client, 2)
        assert (await client.publish_command(command("after"))).ok
        for recorder in recorders.values():
            await recorder.wait()
    assert sorted(letter[b"group"] for letter in letters) == [b"a", b"b"]
    for letter in letters:
        assert letter[b"reason"] == reason.encode()
        assert letter[b"source_stream"] == NORMAL.encode()
        assert letter[b"source_id"] == bad_id.encode()
        for name in (b"signature", b"kid"):
            assert letter.get(name) == fields.get(name)
        if reason == "oversized":
            assert b"payload" not in letter
            assert int(letter[b"payload_bytes"]) == len(fields[b"payload"])
        else:
            assert letter.get(b"payload") == fields.get(b"payload")
        assert letter[b"detail"]
        assert keyring.primary.secret not in letter[b"detail"]
    for recorder in recorders.values():
        assert recorder.ids == ["after"]
    snap = client.metrics_snapshot()
    assert snap[f"rejected.{NORMAL}.{reason}"] == 2
    assert snap["deadletter.total"] == 2
    assert await pending(redis_client, NORMAL, "a") == await pending(redis_client, NORMAL, "b") == 0


async def test_handler_refusal_dead_letters_at_once_with_its_own_reason(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    attempts: list[int] = []

    async def refuse(message: OonaMessage) -> None:
        attempts.append(message.attempt)
        if message.decode(pb.AdaptationCommand).command_id == "odd":
            raise RejectMessage("Not A Token!", "mixed case is not a reason")
        raise RejectMessage("policy_stale_version", "version 3 < 4")

    sub = client.subscribe(NORMAL, "g", refuse, types={CMD})
    async with running(sub.run, "g"):
        await client.publish_command(command("plain"))
        await client.publish_command(command("odd"))
        letters = await dead_letters(redis_client, 2)
    assert attempts == [1, 1]  # no retries
    assert [letter[b"reason"] for letter in letters] == [b"policy_stale_version", b"handler_rejected"]
    assert letters[0][b"detail"] == b"version 3 < 4"
    assert client.metrics_snapshot()["deadletter.policy_stale_version"] == 1


async def test_ignored_types_are_acknowledged_not_dead_lettered(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    client = make_client()
    recorder = Recorder(1)
    sub = client.subscribe(
        NORMAL, "g", recorder, types={CMD}, ignore_types={pb.BUS_MESSAGE_TYPE_FIELD_REPORT}
    )
    async with running(sub.run, "g"):
        await client.publish_field_report(pb.FieldReport())
        await client.publish_command(command("c"))
        await recorder.wait()
    assert recorder.ids == ["c"]
    assert await redis_client.xlen("oona.deadletter") == 0
    assert client.metrics_snapshot()[f"ignored.{NORMAL}"] == 1
    assert await pending(redis_client, NORMAL, "g") == 0


async def test_previous_secret_is_accepted_while_rotating(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis, keyring: KeyRing
) -> None:
    old = make_client(ring=OTHER)
    rotated = make_client(ring=KeyRing(b"the-new-secret-0123456789abcdef", [OTHER.primary.secret]))
    recorder = Recorder(2)
    sub = rotated.subscribe(NORMAL, "g", recorder, types={CMD})
    async with running(sub.run, "g"):
        await old.publish_command(command("old key"))
        await redis_client.xadd(NORMAL, signed(OTHER, envelope_bytes(), kid=False))  # type: ignore[arg-type]
        await recorder.wait()
    assert [m.kid for m in recorder.messages] == [OTHER.kid, None]
