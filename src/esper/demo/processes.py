"""Child services of the demo: Weatherlight and Nissa as real processes.

Weatherlight reports readiness over a private ``NOTIFY_SOCKET`` (the same
sd_notify protocol systemd uses), so the demo waits on a datagram read, not
on a poll. Nissa has no notify support; its ``/readyz`` is probed with a
bounded number of attempts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from esper.core.redis_server import free_port


class ChildFailed(RuntimeError):
    """A child service exited or never became ready."""


class ChildService:
    """One console script run as a child process with its own environment and log file."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = await asyncio.to_thread(_open_log, self.log_path)
        with log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def check_alive(self) -> None:
        if self.process is None or self.process.returncode is not None:
            code = None if self.process is None else self.process.returncode
            raise ChildFailed(f"{self.name} exited (status {code}); see {self.log_path}")

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                process.kill()
                await process.wait()
        return process.returncode


def _open_log(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab")


def console_script(name: str) -> list[str]:
    """The installed console script next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found is None:
        raise ChildFailed(f"{name} is not installed; run `pip install -e .` first")
    return [found]


async def start_weatherlight(
    env: Mapping[str, str], log_path: Path, timeout_s: float = 120.0
) -> ChildService:
    """Start the control plane and return once it has notified READY=1."""
    with tempfile.TemporaryDirectory(prefix="esper-notify-") as tmp:
        address = os.path.join(tmp, "notify.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener.bind(address)
        listener.setblocking(False)
        child = ChildService(
            "weatherlight",
            console_script("esper-weatherlight-service"),
            {**env, "NOTIFY_SOCKET": address},
            log_path,
        )
        await child.start()
        assert child.process is not None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s), asyncio.TaskGroup() as group:
                exited = group.create_task(child.process.wait())
                while True:
                    message = group.create_task(loop.sock_recv(listener, 4096))
                    done, _ = await asyncio.wait({exited, message}, return_when=asyncio.FIRST_COMPLETED)
                    if message in done and b"READY=1" in message.result().split(b"\n"):
                        exited.cancel()
                        return child
                    if exited in done:
                        message.cancel()
                        child.check_alive()
        except TimeoutError:
            await child.stop()
            raise ChildFailed(f"weatherlight not ready within {timeout_s:.0f}s; see {log_path}") from None
        finally:
            listener.close()


async def start_nissa(
    env: Mapping[str, str], log_path: Path, attempts: int = 120
) -> tuple[ChildService, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = ChildService(
        "nissa",
        console_script("esper-nissa-service"),
        {**env, "NISSA_HTTP_HOST": "127.0.0.1", "NISSA_HTTP_PORT": str(port)},
        log_path,
    )
    await child.start()
    for _ in range(attempts):
        child.check_alive()
        if await asyncio.to_thread(_http_ok, f"{url}/readyz"):
            return child, url
        await asyncio.sleep(0.25)
    await child.stop()
    raise ChildFailed(f"nissa not ready; see {log_path}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()
