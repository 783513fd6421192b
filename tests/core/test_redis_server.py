"""The one server runner against real valkey processes: orphans, stale pidfiles, passwords, limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from esper.core.processes import terminate
from esper.core.redis_server import (
    PIDFILE,
    RedisServer,
    RedisServerError,
    ServerExited,
    ServerOptions,
    embedded_options,
    embedded_url,
    stale_server_pid,
)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat_file:  # a zombie is dead too
        return stat_file.read().split(") ", 1)[1][0] != "Z"


def wait_gone(pid: int, within_s: float = 10.0) -> None:
    fd = os.pidfd_open(pid)
    try:
        import select

        select.select([fd], [], [], within_s)
    finally:
        os.close(fd)
    assert not alive(pid), f"pid {pid} still alive"


_OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from esper.core.redis_server import RedisServer, ServerOptions
    die = sys.argv[3] == "1"
    options = ServerOptions(data_dir=Path(sys.argv[1]), port=int(sys.argv[2]), die_with_parent=die)
    server = RedisServer(options)
    server.start()
    print(server.pid, flush=True)
    time.sleep(600)
    """
)


def start_owner(data_dir: Path, port: int, *, die_with_parent: bool) -> tuple[subprocess.Popen[str], int]:
    """A process that starts a server and then idles: (the owner, the server's pid)."""
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data_dir), str(port), "1" if die_with_parent else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    return owner, int(owner.stdout.readline())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_server_dies_with_its_owner(tmp_path: Path) -> None:
    owner, server_pid = start_owner(tmp_path / "d", free_port(), die_with_parent=True)
    assert alive(server_pid)
    owner.kill()  # SIGKILL: the owner gets no chance to stop its child
    owner.wait()
    wait_gone(server_pid)


def test_a_real_orphan_is_found_by_its_pidfile_and_replaced(tmp_path: Path) -> None:
    data, port = tmp_path / "d", free_port()
    owner, orphan = start_owner(data, port, die_with_parent=False)
    owner.kill()
    owner.wait()
    assert alive(orphan)  # a crashed run left its server behind, holding the port
    assert stale_server_pid(data, port) == orphan
    server = RedisServer(ServerOptions(data_dir=data, port=port))
    server.start()
    try:
        wait_gone(orphan)
        assert server.pid != orphan
        assert (data / PIDFILE).read_text().strip() == str(server.pid)
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.close()
    finally:
        server.stop()
    assert not (data / PIDFILE).exists()


def test_a_frozen_orphan_is_ended_by_sigterm_without_waiting_for_the_sigkill_fallback(tmp_path: Path) -> None:
    owner, orphan = start_owner(tmp_path / "d", free_port(), die_with_parent=False)
    owner.kill()
    owner.wait()
    os.kill(orphan, signal.SIGSTOP)  # e.g. a frozen container: it acts on no signal until it runs
    try:
        assert terminate(orphan, 30.0)  # True: SIGTERM (with SIGCONT) was enough, no SIGKILL needed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)
    wait_gone(orphan)


def test_a_recycled_pid_in_the_pidfile_is_left_alone_and_a_foreign_port_holder_is_named(
    tmp_path: Path,
) -> None:
    data = tmp_path / "d"
    data.mkdir()
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            port = squatter.getsockname()[1]
            (data / PIDFILE).write_text(f"{bystander.pid}\n")  # as if the pid had been reused
            assert stale_server_pid(data, port) is None
            with pytest.raises(RedisServerError, match=f"port 127.0.0.1:{port} is in use by another process"):
                RedisServer(ServerOptions(data_dir=data, port=port)).start()
        assert bystander.poll() is None  # never signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_embedded_password_is_private_reused_and_enforced(tmp_path: Path) -> None:
    options = embedded_options(tmp_path, max_bulk_bytes=(1 << 20) + 65536)
    password_file = tmp_path / "redis" / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "redis").stat().st_mode) == 0o700
    assert embedded_options(tmp_path).password == options.password  # reused across restarts
    assert embedded_options(tmp_path).port == options.port
    server = RedisServer(options)
    server.start()
    try:
        assert options.password is not None
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().decode(errors="replace")
        assert options.password not in cmdline  # fed on stdin, never on the command line
        assert "***" in server.display_url
        assert options.password not in server.display_url
        assert embedded_url(tmp_path) == server.url
        anonymous = redis.Redis(port=server.port, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("k", "v")
        anonymous.close()
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert client.set("k", "v")
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.set("fits", b"x" * (1 << 20))  # the bus's largest payload fits
        with pytest.raises((redis.ConnectionError, redis.ResponseError)):  # "invalid bulk length"
            client.set("too-big", b"x" * (2 << 20))  # refused by the server itself
        client.close()
    finally:
        server.stop()


def test_embedded_url_needs_a_set_up_var_dir(tmp_path: Path) -> None:
    with pytest.raises(RedisServerError, match="no embedded server"):
        embedded_url(tmp_path)


def test_extra_arguments_reach_the_server(tmp_path: Path) -> None:
    server = RedisServer(ServerOptions(data_dir=tmp_path, extra_args=("--maxmemory", "7mb")))
    with server:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory")["maxmemory"] == str(7 * 1024 * 1024)
        client.close()


async def test_async_api_reports_a_death_and_restarts_on_the_same_port_with_the_data(tmp_path: Path) -> None:
    options = embedded_options(tmp_path)
    server = RedisServer(options)
    await server.astart()
    client = aioredis.Redis.from_url(server.url)
    await client.set("graft", "seed-1")
    await client.aclose()
    pid = server.pid
    assert pid is not None
    exited = asyncio.create_task(server.wait_exit())
    os.kill(pid, signal.SIGKILL)
    code = await asyncio.wait_for(exited, 10)
    assert code == -signal.SIGKILL
    error = server.exited_error(code)
    assert isinstance(error, ServerExited)
    assert str(options.port) in str(error)
    await server.astop()
    again = RedisServer(options)
    await again.astart()
    try:
        client = aioredis.Redis.from_url(again.url)
        assert await client.get("graft") == b"seed-1"  # append-only file replayed
        await client.aclose()
    finally:
        await again.astop()
    assert not alive(pid)
