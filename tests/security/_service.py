"""Console scripts run as real processes, their output read line by line as it is written."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
LIMIT_S = 60.0  # generous for a loaded machine; every wait ends as soon as its line is read


def run(script: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


class Service:
    """``esper-weatherlight-service`` with JSON logs; each output line is queued as it is written."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        env = {**env, "ESP_LOG_FORMAT": "json", "WEATHERLIGHT_HTTP_PORT": "0"}
        self.proc = subprocess.Popen(
            [str(BIN / "esper-weatherlight-service")],
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, match: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The next JSON log line that ``match``es (blocks on the output, bounded by ``LIMIT_S``)."""
        deadline = time.monotonic() + LIMIT_S
        while True:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"{what} not logged within {LIMIT_S}s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"exited ({self.proc.wait()}) before {what}:\n{self.output}")
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and match(event):
                return event

    def wait_booted(self) -> None:
        listening = self.wait_for(lambda e: e.get("event") == "http server listening", "the probe port")
        self.port = int(listening["port"])
        ready = self.wait_for(lambda e: e.get("event") == "weatherlight.ready", "the end of boot")
        assert ready["http_port"] == self.port
        assert ready["instance"]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10.0) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=10)
        return code
