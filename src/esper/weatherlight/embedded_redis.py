"""The private Redis-protocol server used when ``REDIS_URL`` is unset, supervised asynchronously.

Why: a single-node install should work with no Redis to operate, yet the bus
must survive a crash of its server. So the child runs with append-only
persistence under ``<var_dir>/redis``, on a port chosen once and persisted in
``<var_dir>/redis/port`` (restarts keep the same URL, so clients reconnect
instead of being reconfigured), and it is restarted when it dies. The exit is
awaited (``Process.wait``), never polled. The child gets its own session, so a
Ctrl-C aimed at the service does not kill it before the service has drained:
it is stopped last, explicitly.

Two ways to use it:
- as a supervised worker: ``WorkerSpec("redis", embedded.run_worker, wait_ready=True)``
  (first in boot order, hence stopped last); a death raises ``EmbeddedRedisExited``
  and the supervisor's restart policy and backoff take over;
- as an async context manager that restarts the child itself.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import TracebackType

import structlog

from esper.core.logs import get_logger
from esper.core.redis_server import RedisServerError, ServerOptions, find_server_binary, free_port
from esper.weatherlight.supervisor import BackoffPolicy, WorkerContext

_READY_MARKER = b"Ready to accept connections"


class EmbeddedRedisExited(RuntimeError):
    """The child server exited while it was meant to be running."""


class EmbeddedRedis:
    """Runs, watches and restarts one private server child process."""

    def __init__(
        self,
        var_dir: Path,
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
        restart_backoff: BackoffPolicy | None = None,
        logger: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self.data_dir = Path(var_dir) / "redis"
        self.host = host
        self.binary = binary or find_server_binary()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart_backoff = restart_backoff or BackoffPolicy()
        self.log = logger or get_logger("esper.weatherlight.redis")
        self.port = self._load_port()
        self.restarts = 0  # restarts done by the context-manager watcher
        self.unexpected_exits = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _load_port(self) -> int:
        """The persisted port, or a free one recorded for next time."""
        port_file = self.data_dir / "port"
        try:
            port = int(port_file.read_text().strip())
            if 0 < port < 65536:
                return port
        except (FileNotFoundError, ValueError):
            pass  # first run (or an unreadable file): choose and record a port below
        self.data_dir.mkdir(parents=True, exist_ok=True)
        port = free_port(self.host)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
        return port

    # -- process control ---------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the child and return once it accepts connections."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        options = ServerOptions(data_dir=self.data_dir, port=self.port, host=self.host, append_only=True)
        proc = await asyncio.create_subprocess_exec(
            *options.command(self.binary, self.port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        assert proc.stdout is not None
        try:
            tail = await self._until_ready(proc.stdout)
        except BaseException:  # cancelled mid-start: never leave an unowned child behind
            await _reap(proc, 1.0)
            raise
        if _READY_MARKER not in tail[-1]:
            await _reap(proc, 1.0)
            text = b"".join(tail).decode(errors="replace").strip()
            raise RedisServerError(f"embedded server on port {self.port} did not start: {text}")
        self._proc = proc
        # Keep reading so a chatty child never blocks on a full pipe; ends at the child's EOF.
        self._drain = asyncio.create_task(_discard(proc.stdout), name=f"embedded-redis-log-{proc.pid}")
        self.log.info("embedded redis started", pid=proc.pid, url=self.url, dir=str(self.data_dir))

    async def _until_ready(self, stdout: asyncio.StreamReader) -> list[bytes]:
        """Read the child's log until its readiness line; the last lines read (for errors)."""
        tail: list[bytes] = [b"no output"]
        try:
            async with asyncio.timeout(self.start_timeout_s):
                while _READY_MARKER not in tail[-1]:
                    line = await stdout.readline()
                    if not line:
                        break  # EOF: the child exited during start-up
                    tail = [*tail[-4:], line]
        except TimeoutError:
            tail.append(b"(timed out waiting for readiness)")
        return tail

    async def wait_exit(self) -> int:
        """Wait for the current child to exit; its return code."""
        proc = self._proc
        if proc is None:
            raise EmbeddedRedisExited("not started")
        code = await proc.wait()
        await self._join_drain()
        return code

    async def stop(self) -> None:
        """SIGTERM (the server flushes its append-only file), SIGKILL after ``stop_timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await _reap(proc, self.stop_timeout_s)
            self.log.info("embedded redis stopped", pid=proc.pid, returncode=proc.returncode)
        await self._join_drain()

    async def _join_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            await drain

    # -- as a supervised worker ----------------------------------------------------------

    async def run_worker(self, ctx: WorkerContext) -> None:
        """Run the child until ``ctx.stopping``; raise ``EmbeddedRedisExited`` if it dies."""
        await self.start()
        ctx.mark_ready()
        exited = asyncio.create_task(self.wait_exit(), name="embedded-redis-exit")
        stopping = asyncio.create_task(ctx.stopping.wait(), name="embedded-redis-stopping")
        try:
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not exited.done():  # stopping, or the worker itself is being cancelled
                exited.cancel()
            await asyncio.gather(exited, stopping, return_exceptions=True)
            if exited.cancelled() or exited.exception() is not None:
                await self.stop()
        if exited.cancelled():
            return
        self._proc = None
        if not ctx.stopping.is_set():
            self.unexpected_exits += 1
            raise EmbeddedRedisExited(f"embedded redis exited with code {exited.result()}")

    # -- as an async context manager (restarts by itself) ------------------------------

    async def __aenter__(self) -> EmbeddedRedis:
        self._closing.clear()
        await self.start()
        self._watcher = asyncio.create_task(self._watch(), name="embedded-redis-watch")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        watcher, self._watcher = self._watcher, None
        try:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        finally:
            await self.stop()

    async def _watch(self) -> None:
        """Await the child's exit; unless closing, restart it with backoff."""
        level = 0
        while not self._closing.is_set():
            if self.running:
                code = await self.wait_exit()
                self._proc = None
                self.unexpected_exits += 1
                self.log.warning("embedded redis died; restarting", returncode=code)
            delay = self.restart_backoff.delay(level)
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
                return
            except TimeoutError:
                level += 1
            try:
                await self.start()
                self.restarts += 1
                level = 0
            except (RedisServerError, OSError) as exc:
                self.log.error("embedded redis restart failed", error=str(exc), attempt=level)


async def _reap(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Terminate, then kill if needed; always waits for the exit (no zombies)."""
    if proc.returncode is None:
        try:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), timeout_s)
        except ProcessLookupError:
            pass  # already gone between the check and the signal
        except TimeoutError:
            proc.kill()
    await proc.wait()


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
