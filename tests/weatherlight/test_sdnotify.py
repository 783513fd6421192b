"""sd_notify against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper.core.worker import running
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


async def test_watchdog_worker_pings_through_short_trouble_and_withholds_after_the_interval(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    sock.setblocking(False)
    notifier = SdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})  # 0.2 s: a tick every 0.1 s
    assert notifier.watchdog_enabled
    now = [0.0]
    serving = [True]
    ticked = asyncio.Event()

    async def is_serving() -> bool:
        ticked.set()
        return serving[0]

    async def tick(advance_s: float) -> int:
        """Advance the worker's clock by one tick and let it run it; the pings it sent."""
        ticked.clear()
        now[0] += advance_s
        await asyncio.wait_for(ticked.wait(), 5)
        await asyncio.sleep(0)  # the ping follows the health answer in the same step
        return drain(sock)

    async with running(lambda ctx: notifier.run_watchdog(ctx, is_serving, clock=lambda: now[0]), "wd"):
        await asyncio.wait_for(ticked.wait(), 5)
        await asyncio.sleep(0)
        assert drain(sock) == 1  # serving: pinged
        serving[0] = False
        assert await tick(0.1) == 1  # unhealthy for 0.1 s (< 0.2 s): still pinged
        assert await tick(0.1) == 1  # 0.2 s: still within the interval
        assert await tick(0.1) == 0  # 0.3 s: withheld, so systemd's watchdog fires
        assert await tick(0.1) == 0
        serving[0] = True
        assert await tick(0.1) == 1  # pings resume as soon as it serves again


def drain(sock: socket.socket) -> int:
    count = 0
    while True:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return count
        assert data == b"WATCHDOG=1"
        count += 1


def test_notify_socket_without_watchdog_usec_asks_for_no_watchdog(tmp_path: Path) -> None:
    notifier = SdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    assert notifier.enabled
    assert not notifier.watchdog_enabled
