"""A process that runs one subscription, for tests that kill it (run by :func:`spawn`).

``python oona_child.py MODE REDIS_URL INSTANCE CLAIM_IDLE_MS``; it prints one JSON line per event:
``{"event": "started"}`` once subscribed, ``{"event": "handling", "id": ..., "attempt": ...}`` as a
handler begins. Modes (what the handler does):

- ``hang``: blocks forever (the test kills the process with entries pending under its name);
- ``die``: kills its own process with SIGKILL (a consumer dying mid-handler every time);
- ``pause``: pauses the server's writes (CLIENT PAUSE WRITE), prints ``paused`` and returns a
  reply, so the process is killed while its commit cannot have happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from oona_helpers import CMD, NORMAL, SECRET, make_config, policy  # noqa: E402

from esper.core.worker import running  # noqa: E402
from esper.leyline import leyline_pb2 as pb  # noqa: E402
from esper.oona import OonaClient, OonaMessage, Reply  # noqa: E402
from esper.security.signing import KeyRing  # noqa: E402

READY = pb.BUS_MESSAGE_TYPE_KERNEL_PREFETCH_READY


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main(mode: str, url: str, instance: str, claim_idle_ms: int) -> None:
    client = OonaClient(url, make_config(instance=instance), KeyRing(SECRET))

    async def handler(message: OonaMessage) -> list[Reply]:
        say("handling", id=message.entry_id, attempt=message.attempt)
        if mode == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "pause":
            redis.Redis.from_url(url).execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
            say("paused")
            return [Reply(READY, pb.KernelArtifactReady(request_id=message.entry_id))]
        await asyncio.Event().wait()
        return []

    sub = client.subscribe(NORMAL, "a", handler, types={CMD}, policy=policy(claim_idle_ms=claim_idle_ms))
    async with running(sub.run, "child"):
        say("started")
        await asyncio.Event().wait()


def spawn(mode: str, url: str, instance: str, claim_idle_ms: int = 60_000) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), mode, url, instance, str(claim_idle_ms)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def events(process: subprocess.Popen[str]) -> list[dict[str, object]]:
    """Every event line the process printed until it exited."""
    assert process.stdout is not None
    return [json.loads(line) for line in process.stdout if line.startswith("{")]


async def wait_for_event(
    process: subprocess.Popen[str], event: str, limit_s: float = 20.0
) -> list[dict[str, object]]:
    """Read the process's events (in a thread: a blocking read of its pipe) up to ``event``."""

    def read() -> list[dict[str, object]]:
        assert process.stdout is not None
        seen: list[dict[str, object]] = []
        for line in process.stdout:
            if line.startswith("{"):
                seen.append(json.loads(line))
                if seen[-1]["event"] == event:
                    return seen
        raise AssertionError(f"process exited ({process.wait()}) before {event!r}; saw {seen}")

    return await asyncio.wait_for(asyncio.to_thread(read), limit_s)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
