"""The service as a process, where it matters: busy ports, systemd, kill -9, a second instance, errors.

Each test runs the real console script (or ``service_main`` with one injected
worker) with a private var dir, and judges it only from the outside: exit
codes, output, HTTP probes, the notify socket and ``/proc``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _process_support import SECRET, Service, alive, base_env, run_cli

from esper.core.redis_server import embedded_url


def status(service: Service) -> dict[str, Any]:
    code, body = service.get("/status")
    assert code == 200, body
    data: dict[str, Any] = json.loads(body)
    return data


def valkeys_in(data_dir: Path) -> list[int]:
    """Every live Redis-protocol server process whose working directory is ``data_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().split(") ", 1)[1][0]
        except OSError:
            continue
        if name.startswith(("valkey-server", "redis-server")) and cwd == str(data_dir) and state != "Z":
            found.append(int(entry.name))
    return found


def wait_gone(pid: int, within_s: float = 10.0) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], within_s)
    finally:
        os.close(fd)
    assert not alive(pid), f"pid {pid} still alive"


def test_http_port_taken_fails_fast_naming_the_port_and_check_exits_2(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = base_env(tmp_path, WEATHERLIGHT_HTTP_PORT=str(port))
        began = time.monotonic()
        service = start_service(env)
        code = service.proc.wait(timeout=30)
        took = time.monotonic() - began
        service.kill()
        assert code != 0, service.output
        assert f"127.0.0.1:{port}" in service.output
        assert took <= 5.0, took
        assert not (tmp_path / "var" / "redis" / "server.pid").exists()  # nothing was started

        check = run_cli(env, tmp_path, "--check")
        assert check.returncode == 2, check.stdout + check.stderr
        assert f"WEATHERLIGHT_HTTP_PORT: 127.0.0.1:{port} is already in use" in check.stderr


def test_notify_socket_without_watchdog_usec_runs_no_watchdog_worker_and_stays_healthy(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    """The demo's setup. Nothing is restarted, so no restart-intensity window can ever expire.

    (A watchdog worker that returned at once would have been restarted after
    its first 1 s backoff; the test watches well past that.)
    """
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(60)
        service = start_service(base_env(tmp_path, NOTIFY_SOCKET=address))
        assert b"READY=1" in listener.recv(4096).split(b"\n")
        service.wait_ready()
        deadline = time.monotonic() + 30
        while (snap := status(service))["uptime_s"] < 3.0 or snap["health"] is None:
            assert time.monotonic() < deadline, snap
            time.sleep(0.1)
        names = [w["name"] for w in snap["workers"]]
        assert "sd_watchdog" not in names
        assert snap["restarts_total"] == 0
        assert not [w for w in snap["workers"] if w["status"] != "running"], snap["workers"]
        assert snap["health"]["status"] == "HEALTHY", snap["health"]
        code, _took = service.terminate_and_wait()
        assert code == 0, service.output
        assert b"STOPPING=1" in listener.recv(4096).split(b"\n")


def test_with_watchdog_usec_the_watchdog_worker_pings(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(60)
        service = start_service(base_env(tmp_path, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000"))
        messages = []
        while sum(m == b"WATCHDOG=1" for m in messages) < 2:
            messages.append(listener.recv(4096))
        assert any(b"READY=1" in m for m in messages)
        view = next(w for w in status(service)["workers"] if w["name"] == "sd_watchdog")
        assert view["status"] == "running"
        assert view["required"] is False
        assert service.terminate_and_wait()[0] == 0, service.output


def test_kill_9_then_restart_on_the_embedded_default_is_ready_quickly_with_no_orphan(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    env = base_env(tmp_path)
    data_dir = tmp_path / "var" / "redis"
    first = start_service(env)
    first.wait_ready()
    [old_server] = valkeys_in(data_dir)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait()
    wait_gone(old_server)  # it died with its owner: no orphan holds the port

    began = time.monotonic()
    second = start_service(env)
    second.wait_ready()
    took = time.monotonic() - began
    assert took <= 5.0, took
    servers = valkeys_in(data_dir)
    assert len(servers) == 1, servers
    assert servers[0] != old_server
    assert "Address already in use" not in second.output
    assert second.terminate_and_wait()[0] == 0, second.output
    wait_gone(servers[0])


def test_a_second_instance_in_the_same_var_dir_is_refused_with_exit_2(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    env = base_env(tmp_path)
    first = start_service(env)
    first.wait_ready()
    again = start_service({**base_env(tmp_path), "ESPER_VAR_DIR": env["ESPER_VAR_DIR"]})  # another port
    code = again.proc.wait(timeout=30)
    again.kill()
    assert code == 2, again.output
    assert f"already running, pid {first.proc.pid}" in again.output
    assert "Traceback" not in again.output
    check = run_cli(env, tmp_path, "--check")
    assert check.returncode == 2
    assert f"already running, pid {first.proc.pid}" in check.stderr
    assert first.get("/readyz")[0] == 200  # the running one was not disturbed
    assert first.terminate_and_wait()[0] == 0, first.output


_BROKEN = textwrap.dedent(
    """
    import asyncio, sys
    from esper.weatherlight import cli, service
    from esper.weatherlight import BackoffPolicy, WorkerSpec

    async def read_catalog():
        await asyncio.sleep(0.05)
        raise KeyError("kernel-42")

    class Broken(service.WeatherlightService):
        def specs(self):
            spec = WorkerSpec("indexer", self.indexer, required=False, backoff=BackoffPolicy(base_s=60.0))
            return [*super().specs(), spec]

        async def indexer(self, ctx):
            ctx.started()
            async with asyncio.TaskGroup() as group:
                group.create_task(ctx.stopping.wait())
                group.create_task(read_catalog())

    service.WeatherlightService = Broken
    sys.exit(cli.service_main([]))
    """
)


def test_a_failure_inside_a_components_task_group_shows_its_real_exception_in_logs_and_status(
    tmp_path: Path, redis_url: str, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(tmp_path, REDIS_URL=redis_url), argv=[sys.executable, "-c", _BROKEN])
    service.wait_ready()
    service.wait_for_line("read_catalog")  # the traceback's frames follow the failure line
    output = service.output
    assert "worker failed" in output
    assert "KeyError: 'kernel-42'" in output
    assert "Traceback (most recent call last)" in output
    assert "ExceptionGroup" not in output  # the group was unwrapped
    view = next(w for w in status(service)["workers"] if w["name"] == "indexer")
    assert view["status"] == "backing_off"
    assert view["last_error"] == {"type": "KeyError", "message": "'kernel-42'"}
    assert SECRET not in output
    assert service.terminate_and_wait()[0] == 0, service.output


def test_the_embedded_password_never_appears_in_output_or_status(
    tmp_path: Path, start_service: Callable[..., Service]
) -> None:
    service = start_service(base_env(tmp_path))
    service.wait_ready()
    password = embedded_url(tmp_path / "var").split("@")[0].rsplit(":", 1)[1]
    assert password not in service.output
    assert password not in service.get("/status")[1]
    assert password not in service.get("/metrics")[1]
    assert service.terminate_and_wait()[0] == 0
    assert password not in service.output
