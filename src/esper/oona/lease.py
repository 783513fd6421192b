"""Stable consumer names: a slot leased in Redis per replica, kept across restarts.

A consumer name must be unique among live replicas (two live consumers with
one name would both take up its pending entries) and stable across restarts
(a restarted replica then resumes its own pending entries at once instead of
waiting for another replica to claim them). A replica proves who it is with a
*token*: kept in a file under its var dir, so the same replica gets the same
slot back after a crash, even while its old lease has not expired yet; a new
replica gets the lowest free slot, so names stay few (``weatherlight-0``,
``weatherlight-1``, ...) however often pods are replaced.

The lease is renewed by :meth:`InstanceLease.run` (a worker). Losing it
(the process was frozen for longer than the lease and another replica took
the slot) is fatal on purpose: the process must not keep a name someone
else now uses, and a fresh start takes a new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from esper.core.logs import get_logger
from esper.core.worker import WorkerContext
from esper.oona.keys import KeySpace
from esper.oona.link import TRANSIENT, honour_cancellation
from esper.oona.scripts import LEASE, RELEASE, RENEW

_log = get_logger("esper.oona.lease")


class LeaseLost(RuntimeError):
    """Another replica holds this replica's consumer-name slot now."""


def instance_token(path: Path) -> str:
    """The token stored at ``path`` (created, mode 0600, on first use)."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


class InstanceLease:
    """Leases ``<service>-<n>`` for this replica (see the module docstring)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        service: str,
        token: str,
        *,
        keys: KeySpace | None = None,
        ttl_ms: int = 60_000,
        slots: int = 1024,
    ) -> None:
        self.service = service
        self.token = token
        self.ttl_ms = ttl_ms
        self.slots = slots
        self._key = (keys or KeySpace()).instances(service)
        self._lease = redis.register_script(LEASE)
        self._renew = redis.register_script(RENEW)
        self._release = redis.register_script(RELEASE)
        self.slot: int | None = None

    @property
    def name(self) -> str:
        if self.slot is None:
            raise RuntimeError("no slot leased yet")
        return f"{self.service}-{self.slot}"

    async def acquire(self) -> str:
        """Lease (or take back) a slot; the consumer name to use."""
        slot: Any = await self._lease(keys=[self._key], args=[self.token, self.ttl_ms, self.slots])
        if int(slot) < 0:
            raise LeaseLost(f"all {self.slots} {self.service} consumer names are leased")
        self.slot = int(slot)
        _log.info("oona.instance_leased", instance=self.name)
        return self.name

    async def renew(self) -> None:
        if self.slot is None:
            raise RuntimeError("no slot leased yet")
        held: Any = await self._renew(keys=[self._key], args=[self.slot, self.token, self.ttl_ms])
        if not int(held):
            raise LeaseLost(f"consumer name {self.name} was leased by another replica")

    async def release(self) -> None:
        if self.slot is not None:
            await self._release(keys=[self._key], args=[self.slot, self.token])

    async def run(self, ctx: WorkerContext) -> None:
        """Renew every third of the lease until stopping; raise ``LeaseLost`` if it was taken.

        A Redis outage is waited out: a slot whose lease expired meanwhile is
        still ours unless another replica has taken it.
        """
        ctx.started()
        while not await ctx.wait_stopping(self.ttl_ms / 3000):
            try:
                await self.renew()
            except TRANSIENT as exc:
                honour_cancellation()
                _log.warning("oona.lease_renewal_failed", instance=self.name, error=type(exc).__name__)
            ctx.progress()
