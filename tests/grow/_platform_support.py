"""A real platform for the grow tests: ``esper-weatherlight-service`` as a subprocess.

With ``REDIS_URL`` unset it runs on its own embedded server under a fresh var
dir, as on a user's machine. Readiness is its sd_notify ``READY=1`` datagram
on a private ``NOTIFY_SOCKET`` (the read is bounded so a child that dies
first is noticed).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _environment import esper_free_env

SECRET = "grow-test-secret-0123456789abcdef0123"
SCRIPT = str(Path(sys.executable).with_name("esper-weatherlight-service"))


def platform_env(root: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without Esper settings, plus a private layout under ``root``."""
    env = esper_free_env()
    var = root / "var"
    env.update(
        ESPER_LEYLINE_SECRET=SECRET,
        ESPER_VAR_DIR=str(var),
        URZA_ARTIFACT_DIR=str(var / "urza" / "artifacts"),
        URZA_DATABASE_URL=f"sqlite:///{var / 'urza' / 'catalog.db'}",
        TAMIYO_POLICY_DIR=str(var / "tamiyo" / "policies"),
        WEATHERLIGHT_HTTP_PORT="0",
        ESP_LOG_LEVEL="WARNING",
    )
    env.update(extra)
    return env


@contextmanager
def running_platform(
    root: Path, env: dict[str, str], limit_s: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start Weatherlight with ``env`` (cwd ``root``), yield once it notified READY=1, then stop it."""
    root.mkdir(parents=True, exist_ok=True)
    address = str(root / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.5)
    log = open(root / "weatherlight.log", "wb")  # noqa: SIM115 - closed after the process
    proc = subprocess.Popen(
        [SCRIPT], env={**env, "NOTIFY_SOCKET": address}, cwd=root, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + limit_s
        while True:
            try:
                if b"READY=1" in listener.recv(4096).split(b"\n"):
                    break
            except TimeoutError:
                pass
            assert proc.poll() is None, f"weatherlight exited {proc.returncode}:\n{_log_text(root)}"
            assert time.monotonic() < deadline, f"weatherlight not ready in {limit_s}s:\n{_log_text(root)}"
        yield proc
    finally:
        listener.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _log_text(root: Path) -> str:
    return (root / "weatherlight.log").read_text(errors="replace")[-4000:]
