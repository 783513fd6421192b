"""systemd ``sd_notify`` over the datagram socket named by ``NOTIFY_SOCKET``.

Why not libsystemd: the protocol is one datagram of ``KEY=value`` lines, so a
few lines of stdlib avoid a C dependency. Outside systemd (``NOTIFY_SOCKET``
unset) every call is a no-op, so the service code can call it unconditionally.
Sends never block the event loop (non-blocking socket) and never raise: a
lost notification is logged, and systemd's own timeouts cover the rest.

With ``WatchdogSec=`` set, systemd exports ``WATCHDOG_USEC`` (and
``WATCHDOG_PID``); ``run_watchdog`` pets it at half that interval from an owned
loop, optionally only while a health callable says the service is alive, so a
wedged process is restarted by systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

import structlog

from esper.core.logs import get_logger


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

    async def run_watchdog(self, stopping: asyncio.Event, healthy: Callable[[], bool] | None = None) -> None:
        """Pet the watchdog every half interval until ``stopping`` is set.

        Returns at once when systemd asked for no watchdog. Waiting is an event
        wait with a timeout, so shutdown ends the loop without delay.
        """
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        while not stopping.is_set():
            if healthy is None or healthy():
                self.watchdog()
            else:
                self.log.warning("service unhealthy; withholding watchdog ping")
            try:
                await asyncio.wait_for(stopping.wait(), interval / 2)
            except TimeoutError:
                continue


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
