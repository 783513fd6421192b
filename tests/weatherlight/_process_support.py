"""Running ``esper-weatherlight-service`` as a real process and watching it from the outside."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from _environment import esper_free_env

from esper.core.redis_server import free_port

SECRET = "test-secret-for-esper-lite-0123456789"
SCRIPT = str(Path(sys.executable).with_name("esper-weatherlight-service"))


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment minus every Esper setting, plus a private layout under ``tmp_path``."""
    env = esper_free_env()
    env.update(
        ESPER_LEYLINE_SECRET=SECRET,
        ESPER_VAR_DIR=str(tmp_path / "var"),
        URZA_ARTIFACT_DIR=str(tmp_path / "urza"),
        URZA_DATABASE_URL=f"sqlite:///{tmp_path / 'urza' / 'catalog.db'}",
        WEATHERLIGHT_HTTP_PORT=str(free_port()),
        WEATHERLIGHT_TELEMETRY_INTERVAL_S="0.5",
    )
    env.update(extra)
    return env


class Service:
    """One service process; its merged output is collected by a thread, line by line."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.port = int(env["WEATHERLIGHT_HTTP_PORT"])
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.first_line = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self.first_line.set()
        self.first_line.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2.0) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, limit_s: float = 30.0) -> None:
        deadline = time.monotonic() + limit_s
        while True:
            assert self.proc.poll() is None, f"service exited early:\n{self.output}"
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"not ready within {limit_s}s:\n{self.output}"
            time.sleep(0.05)

    def terminate_and_wait(self, limit_s: float = 10.0) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds until the process exited)."""
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=limit_s)
        took = time.monotonic() - began
        self._reader.join(timeout=5.0)
        return code, took

    def wait_for_line(self, text: str, limit_s: float = 30.0) -> str:
        """The first output line containing ``text`` (waits for it, bounded)."""
        deadline = time.monotonic() + limit_s
        while True:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"{text!r} never logged; exited {self.proc.returncode}:\n{self.output}")
            assert time.monotonic() < deadline, f"{text!r} not logged within {limit_s}s:\n{self.output}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5.0)


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process not yet reaped by its new parent does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"
