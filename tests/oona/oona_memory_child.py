"""Runs one subscription over hostile giant entries and prints how much memory the reader used.

``python oona_memory_child.py REDIS_URL GOOD DEAD``: handles until GOOD good messages arrived and
DEAD dead letters exist, then prints one JSON line: the good command ids, the peak RSS growth since
start (VmHWM after resetting it, bytes) and the tracemalloc peak (bytes).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from oona_helpers import CMD, NORMAL, SECRET, Recorder, dead_letters, make_config

from esper.core.worker import running
from esper.oona import OonaClient
from esper.security.signing import KeyRing


def status_bytes(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(name)


async def main(url: str, good: int, dead: int) -> None:
    client = OonaClient(url, make_config(instance="mem-0"), KeyRing(SECRET))
    recorder = Recorder(good)
    sub = client.subscribe(NORMAL, "a", recorder, types={CMD})
    await client.redis.ping()  # connection set up before measuring
    with open("/proc/self/clear_refs", "w") as refs:  # noqa: ASYNC230 - before the loop runs anything
        refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = status_bytes("VmRSS")
    tracemalloc.start()
    async with running(sub.run, "mem"):
        await recorder.wait(60)
        await dead_letters(client.redis, dead, limit_s=60)
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps({"good": recorder.ids, "rss_growth": status_bytes("VmHWM") - before, "traced_peak": peak})
    )
    await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
