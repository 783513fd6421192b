"""systemd ``sd_notify`` over the datagram socket named by ``NOTIFY_SOCKET``.

Why not libsystemd: the protocol is one datagram of ``KEY=value`` lines, so a
few lines of stdlib avoid a C dependency. Outside systemd (``NOTIFY_SOCKET``
unset) every call is a no-op, so the service code can call it unconditionally.
Sends never block the event loop (non-blocking socket) and never raise: a
lost notification is logged, and systemd's own timeouts cover the rest.

With ``WatchdogSec=`` set, systemd exports ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``); :meth:`SdNotifier.run_watchdog` is then a worker that pets
it at half that interval while the service is not UNHEALTHY, and withholds
the pings once it has been UNHEALTHY for longer than the interval, so
systemd restarts a service whose required paths stay broken (and, with no
pings at all, one whose event loop is wedged). Without ``WATCHDOG_USEC`` the
service runs no watchdog worker at all (``watchdog_enabled`` is false).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext


class SdNotifier:
    """Sends ``READY=1`` / ``WATCHDOG=1`` / ``STOPPING=1`` / ``STATUS=...`` to systemd."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        logger: structlog.stdlib.BoundLogger | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        self.log = logger or get_logger("esper.weatherlight.sdnotify")
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """systemd asked this process for watchdog pings (``WATCHDOG_USEC``, and a socket to send to)."""
        return self.enabled and self.watchdog_interval_s is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=value`` lines; True when it was handed to the socket."""
        if self.address is None or not fields:
            return False
        payload = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            self.log.warning("sd_notify failed", error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify(READY=1, **({"STATUS": status} if status else {}))

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text.replace("\n", " "))

    async def run_watchdog(
        self,
        ctx: WorkerContext,
        serving: Callable[[], Awaitable[bool]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """The watchdog worker: ping every half interval while ``serving()`` has been true recently.

        ``serving()`` answers "is the service not UNHEALTHY?". Pings continue
        through short troubles and stop once the service has not been serving
        for longer than the watchdog interval. Only run this when
        ``watchdog_enabled``.
        """
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            raise RuntimeError("systemd asked for no watchdog: do not run the watchdog worker")
        last_serving = clock()
        withholding = False
        ctx.started()
        while not ctx.stopping.is_set():
            now = clock()
            if await serving():
                last_serving = now
            if now - last_serving <= interval:
                self.watchdog()
                if withholding:
                    self.log.info("service serving again; watchdog pings resumed")
                withholding = False
            elif not withholding:
                withholding = True
                self.log.error(
                    "service unhealthy for longer than the watchdog interval; withholding pings",
                    interval_s=interval,
                )
            ctx.progress()
            if await ctx.wait_stopping(interval / 2):
                return
            ctx.progress()


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds from ``WATCHDOG_USEC`` when it is meant for this process, else None."""
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
