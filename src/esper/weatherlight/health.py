"""The service's one notion of health, shared by ``/readyz``, telemetry and the systemd watchdog.

Why one function: a service whose probe says "ready" while its telemetry
says "degraded" and systemd's watchdog keeps being petted regardless is
lying somewhere. :func:`judge` turns the supervisor snapshot, the live
probes and the bus's own view of its paths into one :class:`Health`:

- *required paths* (``checks``): the supervisor booted and no required worker
  failed; Redis accepts a write (down, a read-only replica and an
  out-of-memory refusal all fail it); the catalogue answers; no breaker on a
  required publish path is open. Any failing one makes the service
  UNHEALTHY and ``/readyz`` 503.
- *degradations*: a worker backing off or starting again, an optional worker
  failed, a consume breaker open. The service still works: DEGRADED, ready.
- otherwise HEALTHY.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from esper.core.breaker import OPEN
from esper.leyline import leyline_pb2
from esper.oona import OonaClient
from esper.urza import UrzaLibrary

HealthStatus: TypeAlias = leyline_pb2.HealthStatus.ValueType
HEALTHY: HealthStatus = leyline_pb2.HEALTH_STATUS_HEALTHY
DEGRADED: HealthStatus = leyline_pb2.HEALTH_STATUS_DEGRADED
UNHEALTHY: HealthStatus = leyline_pb2.HEALTH_STATUS_UNHEALTHY
PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Check:
    """One required path: ``ok`` with a human ``detail`` (never a secret)."""

    name: str
    ok: bool
    detail: str = "ok"


@dataclass(frozen=True)
class Health:
    checks: tuple[Check, ...]
    degraded: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def status(self) -> HealthStatus:
        if not self.ready:
            return UNHEALTHY
        return DEGRADED if self.degraded else HEALTHY

    @property
    def problems(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)

    @property
    def summary(self) -> str:
        return ", ".join(self.problems + self.degraded) or "steady"

    def view(self) -> dict[str, Any]:
        return {
            "status": leyline_pb2.HealthStatus.Name(self.status).removeprefix("HEALTH_STATUS_"),
            "ready": self.ready,
            "problems": list(self.problems),
            "degraded": list(self.degraded),
        }


def judge(
    snapshot: Mapping[str, Any],
    *,
    redis: Check,
    catalog: Check,
    bus: Sequence[str],
    breakers: Mapping[str, int],
) -> Health:
    """Combine a ``Supervisor.snapshot()``, the two probes and the bus's problems into one verdict.

    ``bus`` lists what stops a required publish path (see :func:`bus_problems`);
    ``breakers`` are every breaker's Leyline state, for the degradations.
    """
    workers = snapshot["workers"]
    failed_required = [w["name"] for w in workers if w["required"] and w["status"] == "failed"]
    if snapshot["stopping"]:
        worker_check = Check("workers", False, "stopping")
    elif failed_required:
        worker_check = Check("workers", False, f"failed: {', '.join(failed_required)}")
    elif not snapshot["booted"]:
        worker_check = Check("workers", False, "booting")
    else:
        worker_check = Check("workers", True)
    bus_check = Check("bus", not bus, "; ".join(bus) or "ok")
    degraded = [
        f"{w['name']}:{w['status']}"
        for w in workers
        if w["status"] in ("backing_off", "starting") or (w["status"] == "failed" and not w["required"])
    ]
    degraded += [f"breaker:{name}" for name, state in sorted(breakers.items()) if state == OPEN]
    if not snapshot["booted"]:
        degraded = [d for d in degraded if not d.endswith(":starting")]
    return Health((worker_check, redis, catalog, bus_check), tuple(degraded))


def bus_problems(clients: Mapping[str, OonaClient]) -> list[str]:
    """What keeps a bus path from working, as each role's client reports it.

    An open publish breaker, commits (acknowledgements, replies, dead
    letters) the server refuses, a reader that cannot read: each is a path
    the service needs (see ``OonaClient.problems``).
    """
    return [problem for _role, client in sorted(clients.items()) for problem in client.problems()]


async def probe_redis(client: OonaClient | None) -> Check:
    """A real write through the bus's client: the bus works only if Redis accepts writes."""
    if client is None:
        return Check("redis", False, "not connected yet")
    problem = await client.probe(PROBE_TIMEOUT_S)
    return Check("redis", problem is None, problem or "ok")


async def probe_catalog(library: UrzaLibrary | None) -> Check:
    if library is None:
        return Check("catalog", False, "not open yet")
    try:
        await asyncio.wait_for(library.aget("__readyz__"), PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any database failure means "not ready"; its type says which
        return Check("catalog", False, f"unreachable ({type(exc).__name__})")
    return Check("catalog", True)
