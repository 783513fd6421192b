"""sd_notify against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.weatherlight.sdnotify import SdNotifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_no_socket_is_a_noop() -> None:
    notifier = SdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval_s is None


def test_ready_status_stopping_and_watchdog(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = SdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("serving on :9101")
    assert received(sock) == {"READY": "1", "STATUS": "serving on :9101"}
    assert notifier.status("2 workers\nbacking off")
    assert received(sock) == {"STATUS": "2 workers backing off"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1"}


def test_abstract_namespace_socket() -> None:
    name = f"esper-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert SdNotifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == {"READY": "1"}


def test_missing_socket_is_logged_not_raised(tmp_path: Path) -> None:
    assert SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")}).ready() is False


def test_watchdog_interval_only_for_this_process() -> None:
    mine = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    assert SdNotifier(mine).watchdog_interval_s == 4.0
    assert SdNotifier({**mine, "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert SdNotifier({**mine, "WATCHDOG_USEC": "junk"}).watchdog_interval_s is None


async def test_watchdog_loop_pets_at_half_interval_and_stops(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    sock.setblocking(False)
    notifier = SdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # 0.1 s
    stopping = asyncio.Event()
    healthy = True
    task = asyncio.create_task(notifier.run_watchdog(stopping, lambda: healthy))
    await asyncio.sleep(0.22)  # pings at 0, 0.05, 0.10, 0.15, 0.20
    pings = drain(sock)
    assert pings >= 3
    healthy = False
    await asyncio.sleep(0.12)
    drain(sock)  # at most one ping in flight when health flipped
    await asyncio.sleep(0.12)
    assert drain(sock) == 0  # an unhealthy service lets systemd's watchdog fire
    stopping.set()
    await asyncio.wait_for(task, 1)


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return count
        assert data == b"WATCHDOG=1"
        count += 1


async def test_watchdog_loop_returns_when_not_requested() -> None:
    await asyncio.wait_for(SdNotifier({}).run_watchdog(asyncio.Event()), 1)
