"""``esper-oona``: dead-letter inspection, replay to the rejecting group only, refusals, stream overview.

The last tests run it as a process against the embedded server of a real
``esper-weatherlight-service`` (no ``REDIS_URL``), as an operator would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from _environment import esper_free_env
from oona_helpers import (
    CMD,
    DLQ,
    NORMAL,
    SECRET,
    Recorder,
    command,
    command_id,
    dead_letters,
    envelope_bytes,
    now_ms,
    signed,
)
from security._service import BIN, LIMIT_S, Service, run

from esper.core.redis_server import embedded_url, free_port
from esper.core.worker import running
from esper.oona import OonaClient, OonaMessage
from esper.oona.cli import oona_main
from esper.security.signing import KeyRing


def json_lines(text: str) -> list[dict[str, Any]]:
    """CLI output lines (log lines printed meanwhile are skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, isolated_env: object, redis_url: str) -> str:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ESPER_LEYLINE_SECRET", SECRET.decode())
    return redis_url


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    capsys.readouterr()
    code = await asyncio.to_thread(oona_main, list(argv))
    captured = capsys.readouterr()
    return code, json_lines(captured.out), captured.err


async def test_dlq_list_show_replay_to_the_rejecting_group_only(
    cli_env: str,
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    keyring: KeyRing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()
    fail = True
    handled_a, handled_b = Recorder(), Recorder(2)
    commits_b: asyncio.Queue[list[str]] = asyncio.Queue()

    async def flaky(message: OonaMessage) -> None:
        if fail and command_id(message) == "again":
            raise RuntimeError("boom")
        await handled_a(message)

    sub_a = client.subscribe(NORMAL, "a", flaky, types={CMD})
    sub_b = client.subscribe(NORMAL, "b", handled_b, types={CMD}, on_committed=commits_b.put_nowait)
    async with running(sub_a.run, "a"), running(sub_b.run, "b"):
        await client.publish_command(command("both"))
        await client.publish_command(command("again"))
        await handled_b.wait()
        [failed] = await dead_letters(redis_client, 1)
        [(_id, both)] = (await redis_client.xrange(NORMAL, count=1))[:1]
        await redis_client.xadd(NORMAL, both)  # type: ignore[arg-type]  # replay x2
        for issued in (now_ms() - 600_000, now_ms() + 600_000):  # stale x2, future x2
            await redis_client.xadd(NORMAL, signed(keyring, envelope_bytes(issued_at_ms=issued)))  # type: ignore[arg-type]
        await redis_client.xadd(NORMAL, {b"payload": envelope_bytes()})  # type: ignore[arg-type]  # unsigned x2
        letters = await dead_letters(redis_client, 9)
        assert failed[b"reason"] == b"handler_failed"
        assert failed[b"group"] == b"a"

        code, rows, _err = await cli(capsys, "dlq", "list", "--limit", "20")
        assert code == 0
        assert len(rows) == 9
        by_reason: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_reason.setdefault(row["reason"], []).append(row)
        assert {r: len(v) for r, v in by_reason.items()} == {
            "handler_failed": 1,
            "replay": 2,
            "stale": 2,
            "future": 2,
            "unsigned": 2,
        }
        failed_id = by_reason["handler_failed"][0]["id"]
        code, [shown], _err = await cli(capsys, "dlq", "show", failed_id)
        assert code == 0
        assert shown["message_type"] == "BUS_MESSAGE_TYPE_ADAPTATION_COMMAND"
        assert (shown["source_stream"], shown["group"]) == (NORMAL, "a")
        assert set(shown["attributes"]) == {"issued_at_ms", "nonce", "source"}

        for reason in ("stale", "future", "replay", "unsigned"):
            code, _rows, err = await cli(capsys, "dlq", "replay", by_reason[reason][0]["id"])
            assert code == 1, reason
            assert "not replaying" in err
        code, _rows, err = await cli(capsys, "dlq", "replay", "1-1")
        assert (code, "no dead letter" in err) == (1, True)

        fail = False
        code, [done], _err = await cli(capsys, "dlq", "replay", failed_id)
        assert code == 0
        assert (done["stream"], done["group"]) == (NORMAL, "a")
        while done["entry_id"] not in await asyncio.wait_for(commits_b.get(), 10):
            pass  # group b acknowledged the handed-back copy without handling it
        handled_a.expect(2)
        await handled_a.wait()
    assert [command_id(m) for m in handled_a.messages] == ["both", "again"]
    assert handled_a.messages[1].attributes["target_group"] == "a"
    assert handled_b.ids == ["both", "again"]  # b never handled it again
    remaining = [eid.decode() for eid, _ in await redis_client.xrange(DLQ)]
    assert failed_id not in remaining
    assert len(remaining) == len(letters) - 1

    code, rows, _err = await cli(capsys, "streams")
    assert code == 0
    streams = {row["stream"]: row for row in rows}
    assert len(streams) == 8
    assert set(streams[NORMAL]["groups"]) == {"a", "b"}
    assert streams[NORMAL]["pending"] == 0
    assert streams[DLQ]["length"] == 8


async def test_a_failed_re_publish_keeps_the_dead_letter_and_force_replays_a_stale_one(
    cli_env: str,
    make_client: Callable[..., OonaClient],
    redis_client: aioredis.Redis,
    keyring: KeyRing,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client = make_client()
    handled = Recorder(1)
    sub = client.subscribe(NORMAL, "a", handled, types={CMD})
    async with running(sub.run, "a"):
        stale = signed(keyring, envelope_bytes(issued_at_ms=now_ms() - 600_000))
        await redis_client.xadd(NORMAL, stale)  # type: ignore[arg-type]
        await dead_letters(redis_client, 1)
    [(letter_id, _f)] = await redis_client.xrange(DLQ)
    await redis_client.rename(NORMAL, "kept-aside")
    await redis_client.set(NORMAL, b"not a stream")
    code, _rows, err = await cli(capsys, "dlq", "replay", "--force", letter_id.decode())
    assert code == 1
    assert "the dead letter is kept" in err
    assert await redis_client.xlen(DLQ) == 1
    await redis_client.delete(NORMAL)
    await redis_client.rename("kept-aside", NORMAL)
    async with running(sub.run, "a"):
        code, [done], _err = await cli(capsys, "dlq", "replay", "--force", letter_id.decode())
        assert code == 0
        await handled.wait()
    assert handled.messages[0].entry_id == done["entry_id"]
    assert await redis_client.xlen(DLQ) == 0


async def test_dlq_list_pages_through_more_entries_than_one_reply_may_hold(
    cli_env: str, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(1500):
            pipe.xadd(DLQ, {b"reason": b"unsigned", b"source_id": f"{i}-0".encode()})
        await pipe.execute()
    code, rows, _err = await cli(capsys, "dlq", "list", "--limit", "1200")
    assert code == 0
    assert [row["source_id"] for row in rows] == [f"{i}-0" for i in range(1499, 299, -1)]


async def test_hostile_dead_letter_fields_are_shown_bounded_and_escaped(
    cli_env: str, redis_client: aioredis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = {
        b"reason": b"unsigned\n{forged}",
        b"group": b"g" * 100_000,
        b"detail": b"d" * 100_000,
        b"payload_bytes": b"12",
        b"payload": envelope_bytes(**{"k" * 5000: "v" * 50_000}),
    }
    letter = (await redis_client.xadd(DLQ, fields)).decode()  # type: ignore[arg-type]
    code, [listed], _err = await cli(capsys, "dlq", "list")
    assert code == 0
    assert listed["reason"] == "unsigned\\x0a{forged}"
    assert listed["group"].endswith("...[100000 bytes]")
    assert len(listed["group"]) < 200
    assert len(listed["detail"]) < 1100
    code, [shown], _err = await cli(capsys, "dlq", "show", letter)
    assert code == 0
    [(name, value)] = [item for item in shown["attributes"].items() if item[0].startswith("k")]
    assert (len(name) < 200, len(value) < 1100) == (True, True)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def test_looking_needs_no_secret_and_replaying_does(
    isolated_env: object,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    assert oona_main(["streams"]) == 0
    captured = capsys.readouterr()
    assert len(json_lines(captured.out)) == 8
    assert "the bus is empty" in one_line(captured.err)
    assert oona_main(["dlq", "list"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert one_line(captured.err) == "no dead letters in oona.deadletter"
    assert oona_main(["dlq", "show", "1-1"]) == 1
    assert "no dead letter 1-1" in one_line(capsys.readouterr().err)
    assert oona_main(["dlq", "replay", "1-1"]) == 2
    assert "ESPER_LEYLINE_SECRET" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:99999/0", "REDIS_URL: port '99999' is not a number from 1 to 65535"),
        ("redis://127.0.0.1:port/0", "REDIS_URL: port 'port' is not a number from 1 to 65535"),
        ("http://127.0.0.1:6379/0", "REDIS_URL: must be a redis://"),
        ("redis+sentinel://127.0.0.1:26379", "REDIS_URL: redis+sentinel URL: name the service"),
    ],
)
def test_a_malformed_redis_url_is_one_line_exit_2(
    isolated_env: object,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    url: str,
    expected: str,
) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    assert oona_main(["streams"]) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_a_malformed_id_is_one_line_exit_2(cli_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["dlq", "show", "newest"], ["dlq", "replay", "1-1\n2-2"]):
        assert oona_main(argv) == 2
        assert "is not a dead-letter id" in one_line(capsys.readouterr().err)


def test_help_documents_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        oona_main(["--help"])
    out = capsys.readouterr().out
    for word in ("dlq", "streams", "REDIS_URL"):
        assert word in out


# ------------------------------------------------------------------ against a running service


SERVICE_SECRET = "service-secret-for-the-oona-cli-0123456789"
REQUESTS = "oona.kernels.requests"


def esper_oona(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("esper-oona", *args, env=env, cwd=cwd)


def next_dead_letter(url: str) -> str:
    """Block on the dead-letter stream until an entry arrives (bounded); its id."""
    client = redis.Redis.from_url(url)
    try:
        for _stream, items in client.xread({DLQ: "0"}, count=1, block=int(LIMIT_S * 1000)) or []:
            return str(items[0][0].decode())
    finally:
        client.close()
    raise AssertionError(f"no dead letter within {LIMIT_S}s")


def test_esper_oona_finds_the_embedded_server_with_no_secret_and_fails_in_one_line(tmp_path: Path) -> None:
    env = esper_free_env()  # no secret and no REDIS_URL for esper-oona; the service gets its own secret
    service = Service({**env, "ESPER_LEYLINE_SECRET": SERVICE_SECRET}, tmp_path)
    try:
        service.wait_booted()
        url = embedded_url(tmp_path / "var")
        password = (tmp_path / "var" / "redis" / "password").read_text().strip()
        outputs: list[str] = []

        streams = esper_oona(env, tmp_path, "streams")
        outputs.append(streams.stdout + streams.stderr)
        assert streams.returncode == 0, streams.stderr
        rows = {row["stream"]: row for row in json_lines(streams.stdout)}
        assert len(rows) == 8
        assert "urza-prefetch" in rows[REQUESTS]["groups"]  # the service's own consumer group

        empty = esper_oona(env, tmp_path, "dlq", "list")
        assert (empty.returncode, empty.stdout) == (0, "")
        assert one_line(empty.stderr) == "no dead letters in oona.deadletter"

        # A hostile entry written straight into the server: the service dead-letters it.
        client = redis.Redis.from_url(url)
        try:
            client.xadd(REQUESTS, {b"payload": b"\x00unsigned\n" * 8})
        finally:
            client.close()
        letter = next_dead_letter(url)
        listed = esper_oona(env, tmp_path, "dlq", "list")
        assert listed.returncode == 0, listed.stderr
        [row] = json_lines(listed.stdout)
        assert (row["id"], row["reason"], row["source_stream"]) == (letter, "unsigned", REQUESTS)
        shown = esper_oona(env, tmp_path, "dlq", "show", letter)
        assert shown.returncode == 0, shown.stderr
        assert json_lines(shown.stdout)[0]["id"] == letter
        outputs += [listed.stdout + listed.stderr, shown.stdout + shown.stderr]

        refused = esper_oona(env, tmp_path, "dlq", "replay", letter)
        assert refused.returncode == 2
        assert "ESPER_LEYLINE_SECRET" in one_line(refused.stderr)

        port = url.rsplit(":", 1)[1].split("/")[0]
        for bad_login in (f"redis://:wrong-password@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0"):
            failed = esper_oona({**env, "REDIS_URL": bad_login}, tmp_path, "streams")
            assert failed.returncode == 2
            line = one_line(failed.stderr)
            assert "refused the login" in line
            assert "wrong-password" not in line
            outputs.append(failed.stdout + failed.stderr)
    finally:
        assert service.stop() == 0, service.output

    # The service is gone and its port closed: the embedded URL no longer answers.
    gone = esper_oona(env, tmp_path, "streams")
    assert gone.returncode == 2
    line = one_line(gone.stderr)
    assert line.startswith("error: cannot reach the bus at redis://:***@127.0.0.1:"), line
    assert "the embedded server under var/redis" in line
    closed = esper_oona(
        {**env, "REDIS_URL": f"redis://:{password}@127.0.0.1:{free_port()}/0"}, tmp_path, "streams"
    )
    assert closed.returncode == 2
    assert "cannot reach the bus at redis://:***@127.0.0.1:" in one_line(closed.stderr)
    outputs += [gone.stdout + gone.stderr, closed.stdout + closed.stderr]
    assert password not in "\n".join(outputs)


def test_after_config_init_esper_oona_works_from_that_directory(tmp_path: Path) -> None:
    env = esper_free_env()
    init = run("esper-config", "init", env=env, cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    service = Service(env, tmp_path)  # the secret comes from .env, like esper-oona's
    try:
        service.wait_booted()
        streams = esper_oona(env, tmp_path, "streams")
        assert streams.returncode == 0, streams.stderr
        assert len(json_lines(streams.stdout)) == 8
        listed = esper_oona(env, tmp_path, "dlq", "list")
        assert (listed.returncode, listed.stdout) == (0, "")
        assert "no dead letters" in one_line(listed.stderr)
        # replay reads the secret from .env too: it gets as far as looking the entry up.
        missing = esper_oona(env, tmp_path, "dlq", "replay", "1-1")
        assert missing.returncode == 1
        assert "no dead letter 1-1" in one_line(missing.stderr)
    finally:
        assert service.stop() == 0, service.output


def test_a_reader_that_stops_reading_is_not_reported_as_an_unreachable_bus(
    tmp_path: Path, redis_url: str
) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head -0`: every write to stdout fails with EPIPE
    try:
        done = subprocess.run(
            [str(BIN / "esper-oona"), "streams"],
            env={**esper_free_env(), "REDIS_URL": redis_url},
            cwd=tmp_path,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    assert "cannot reach" not in done.stderr
    assert "Traceback" not in done.stderr
