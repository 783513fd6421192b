"""A tiny asyncio HTTP/1.1 server for probes, metrics and status.

Why hand-rolled: the service needs four read-only endpoints for Kubernetes
probes, Prometheus and operators, and pulling in a web framework for that
would add a dependency and its own event-loop machinery. One request per
connection (``Connection: close``), bounded header size and read time, and a
400 for anything malformed: a bad client can never crash the server or pin
a connection open forever.

- ``/livez``: 200 while the event loop answers at all.
- ``/readyz``: 200 only when every readiness check passes (each bounded by its
  own timeout), else 503; ``?verbose`` lists ``[+]name ok`` / ``[-]name failed: why``.
  A check is one named probe (``add_check``) or a provider that judges several
  named paths in one pass (``add_checks``), so one health function can back
  ``/readyz`` and everything else that reports health.
- ``/metrics``: Prometheus text from a ``CollectorRegistry``.
- ``/status`` (and any route added with ``add_json_route``): JSON from a callable, with every URL
  password masked (as in ``/readyz?verbose`` details).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from esper.core.logs import get_logger
from esper.core.redact import mask_data, mask_url
from esper.core.worker import WorkerContext

ReadinessCheck = Callable[[], Awaitable[tuple[bool, str]]]
#: Several named results at once: ``[(name, ok, detail), ...]``.
ReadinessReport = Callable[[], Awaitable[Sequence[tuple[str, bool, str]]]]
_MAX_HEADER_BYTES = 16 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class _Check:
    name: str  # reported when the provider itself fails or times out
    report: ReadinessReport
    timeout_s: float


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class HealthServer:
    """Serves ``/livez``, ``/readyz``, ``/metrics`` and JSON routes until ``stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        registry: CollectorRegistry = REGISTRY,
        status: Callable[[], Mapping[str, Any]] | None = None,
        read_timeout_s: float = 5.0,
        logger: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self.registry = registry
        self._json_routes: dict[str, Callable[[], Any]] = {}
        if status is not None:
            self.add_json_route("/status", status)
        self._checks: list[_Check] = []
        self._read_timeout_s = read_timeout_s
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.log = logger or get_logger("esper.http")

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> HealthServer:
        """Bind to ``WEATHERLIGHT_HTTP_HOST`` / ``WEATHERLIGHT_HTTP_PORT``."""
        return cls(settings.weatherlight_http_host, settings.weatherlight_http_port, **kwargs)

    def add_check(self, name: str, check: ReadinessCheck, timeout_s: float = 2.0) -> None:
        """Register a readiness check: an async callable returning ``(ok, detail)``."""

        async def report() -> Sequence[tuple[str, bool, str]]:
            ok, detail = await check()
            return [(name, ok, detail)]

        self.add_checks(name, report, timeout_s)

    def add_checks(self, name: str, report: ReadinessReport, timeout_s: float = 2.0) -> None:
        """Register a provider of several named results; ``name`` stands for it when it fails."""
        if any(c.name == name for c in self._checks):
            raise ValueError(f"duplicate readiness check {name!r}")
        self._checks.append(_Check(name, report, timeout_s))

    def add_json_route(self, path: str, body: Callable[[], Any]) -> None:
        """Serve ``GET path`` as the JSON rendering of ``body()`` (e.g. ``/status``, ``/alerts``)."""
        if path in ("/livez", "/readyz", "/metrics") or path in self._json_routes:
            raise ValueError(f"route {path!r} is already served")
        self._json_routes[path] = body

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self._port)
        self.log.info("http server listening", host=self.host, port=self.port)

    async def stop(self) -> None:
        """Stop listening, cancel open connections and wait for their handlers."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections))
        await server.wait_closed()

    async def run(self, ctx: WorkerContext) -> None:
        """The server as a worker: started once the port is bound, stopped when ``ctx.stopping``."""
        await self.start()
        try:
            ctx.started()
            await ctx.wait_stopping()
        finally:
            await self.stop()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- request handling -------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._read_timeout_s)
                method, target = _parse_head(head)
            except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                response = _Response(400, b"bad request\n")
                method = "GET"
            else:
                response = await self._route(method, target)
            await self._write(writer, response, head_only=method == "HEAD")
        except ConnectionError as exc:  # the client went away: nothing left to answer
            self.log.debug("http client disconnected", error=str(exc))
        except Exception:  # a handler bug must not take the server down with it
            self.log.exception("http handler failed")
        except asyncio.CancelledError:
            # ``stop()`` cancels open connections and awaits them. Ending normally here keeps
            # Python 3.11's stream callback (it calls ``task.exception()`` on the finished
            # handler) from logging the cancellation as an error.
            self.log.debug("connection cancelled by stop()")
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (ConnectionError, TimeoutError, asyncio.CancelledError):
                self.log.debug("connection closed uncleanly")

    async def _write(self, writer: asyncio.StreamWriter, response: _Response, *, head_only: bool) -> None:
        reason = _REASONS.get(response.status, "Error")
        header = (
            f"HTTP/1.1 {response.status} {reason}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(header if head_only else header + response.body)
        await writer.drain()

    async def _route(self, method: str, target: str) -> _Response:
        if method not in ("GET", "HEAD"):
            return _Response(405, b"method not allowed\n")
        parts = urlsplit(target)
        query = parse_qs(parts.query, keep_blank_values=True)
        if parts.path == "/livez":
            return _Response(200, b"ok\n")
        if parts.path == "/readyz":
            return await self._readyz(verbose="verbose" in query)
        if parts.path == "/metrics":
            return _Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        route = self._json_routes.get(parts.path)
        if route is not None:
            # Every value masked, like log fields: a URL password anywhere in it never leaves the process.
            body = json.dumps(mask_data(route(), render=str), sort_keys=True).encode()
            return _Response(200, body + b"\n", "application/json")
        return _Response(404, b"not found\n")

    async def check_readiness(self) -> list[tuple[str, bool, str]]:
        """Run every check concurrently, each under its own timeout; never raises."""
        results = await asyncio.gather(*(self._run_check(c) for c in self._checks))
        return [line for lines in results for line in lines]

    async def _run_check(self, check: _Check) -> list[tuple[str, bool, str]]:
        try:
            lines = await asyncio.wait_for(check.report(), check.timeout_s)
        except TimeoutError:
            return [(check.name, False, f"timed out after {check.timeout_s}s")]
        except Exception as exc:  # noqa: BLE001 - a failing probe is a "not ready" answer, reported in its detail
            return [(check.name, False, mask_url(f"{type(exc).__name__}: {exc}"))]
        return [(str(name), bool(ok), mask_url(str(detail))) for name, ok, detail in lines]

    async def _readyz(self, *, verbose: bool) -> _Response:
        results = await self.check_readiness()
        ready = all(ok for _, ok, _ in results)
        status = 200 if ready else 503
        if not verbose:
            return _Response(status, b"ok\n" if ready else b"not ready\n")
        lines = [
            f"[+]{name} ok" if ok else f"[-]{name} failed: {detail or 'not ready'}"
            for name, ok, detail in results
        ]
        lines.append("readyz check passed" if ready else "readyz check failed")
        return _Response(status, ("\n".join(lines) + "\n").encode())


def _parse_head(head: bytes) -> tuple[str, str]:
    """Method and target from the request line; ``ValueError`` for anything malformed."""
    if len(head) > _MAX_HEADER_BYTES:
        raise ValueError("header too large")
    request_line = head.split(b"\r\n", 1)[0].decode("ascii")  # UnicodeDecodeError is a ValueError
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise ValueError("malformed request line")
    method, target, _ = parts
    if not method.isalpha() or not method.isupper():
        raise ValueError("malformed method")
    return method, target
