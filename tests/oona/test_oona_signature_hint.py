"""Entries signed with another secret: each one dead-lettered, and one clear hint, rate-limited."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as aioredis
from oona_helpers import CMD, NORMAL, Recorder, command, dead_letters, reasons
from structlog.testing import capture_logs

from esper.core.worker import running
from esper.oona import OonaClient
from esper.oona.link import SignatureHint
from esper.security.signing import KeyRing

OTHER = KeyRing(b"another-deployment-secret-0123456789")


async def test_many_foreign_signatures_give_one_hint_naming_the_setting(
    make_client: Callable[..., OonaClient], redis_client: aioredis.Redis
) -> None:
    reader, stranger, friend = make_client(), make_client(ring=OTHER), make_client()
    handled = Recorder(1)
    sub = reader.subscribe(NORMAL, "a", handled, types={CMD})
    with capture_logs() as logs:
        async with running(sub.run, "a"):
            for i in range(5):
                assert await stranger.publish_command(command(f"foreign-{i}"))
            letters = await dead_letters(redis_client, 5)
            assert await friend.publish_command(command("ours"))
            await handled.wait()
    assert reasons(letters) == ["bad_signature"] * 5
    hints = [entry for entry in logs if entry["event"] == "oona.signed_with_another_secret"]
    assert len(hints) == 1
    assert "ESPER_LEYLINE_SECRET" in hints[0]["hint"]
    assert not any(b"another-deployment-secret" in repr(entry).encode() for entry in logs)


def test_the_hint_repeats_only_after_its_interval_with_the_count_since() -> None:
    now = [100.0]
    hint = SignatureHint(every_s=60.0, clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(3):
            hint.bad_signature("oona.normal")
        now[0] += 61
        hint.bad_signature("oona.normal")
    counts = [entry["rejected_since_last_hint"] for entry in logs]
    assert counts == [1, 3]
