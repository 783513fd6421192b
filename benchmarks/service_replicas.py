"""Real ``esper-weatherlight-service`` processes for benchmarks, each a replica with its own var dir.

A replica is started with a clean environment (nothing of the caller's
Esper settings leaks in), its own ``ESPER_VAR_DIR``, HTTP port and working
directory, and the shared bus and Urza library it is given. Readiness is the
service's own ``READY=1`` datagram on a ``NOTIFY_SOCKET`` bound by the
benchmark, so nothing polls. The CPU a replica has used is read from
``/proc/<pid>/stat`` (every thread counts).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from esper.core.redis_server import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _environment import esper_free_env  # the tests' one Esper-free environment

SERVICE = str(Path(sys.executable).with_name("esper-weatherlight-service"))
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14 and 15)


def context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of a live process: how often it slept and woke."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        total += int(status.split("voluntary_ctxt_switches:", 1)[1].split()[0])
    return total


class Replica:
    """One service process; ``start()`` returns once it has sent READY=1."""

    def __init__(
        self, name: str, var_dir: Path, *, secret: str, redis_url: str, extra_env: Mapping[str, str]
    ) -> None:
        self.name = name
        self.var = var_dir
        self.port = free_port()
        self.env = esper_free_env(
            ESPER_LEYLINE_SECRET=secret,
            REDIS_URL=redis_url,
            ESPER_VAR_DIR=str(self.var),
            TAMIYO_POLICY_DIR=str(self.var / "tamiyo" / "policies"),
            WEATHERLIGHT_HTTP_PORT=str(self.port),
            ESP_LOG_LEVEL="WARNING",
        )
        self.env.update(extra_env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.var.with_name(f"{self.var.name}.log")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> None:
        self.var.mkdir(parents=True, exist_ok=True)
        notify = self.var / "notify.sock"
        notify.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, self.log_path.open("ab") as log:
            sock.bind(str(notify))
            sock.settimeout(timeout_s)
            env = dict(self.env, NOTIFY_SOCKET=str(notify))
            self.proc = subprocess.Popen(
                [SERVICE], env=env, cwd=self.var, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                while b"READY=1" not in sock.recv(4096).split(b"\n"):
                    pass
            except TimeoutError:
                raise RuntimeError(
                    f"{self.name} not ready within {timeout_s}s; see {self.log_path}"
                ) from None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/status", timeout=10) as response:
            document: dict[str, Any] = json.loads(response.read())
            return document

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def token(self) -> str:
        """The instance token this replica holds its leased name with (see ``esper.oona.lease``)."""
        return (self.var / "instance-token").read_text().strip()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap: nothing of the process runs its shutdown."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM and wait; the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
