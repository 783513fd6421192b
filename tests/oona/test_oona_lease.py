"""Leased consumer names: unique among live replicas, stable for one replica, lost when taken."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from esper.oona import InstanceLease, LeaseLost, instance_token
from esper.oona.keys import KeySpace


async def test_different_tokens_get_different_slots_and_a_token_gets_its_slot_back(
    redis_client: aioredis.Redis,
) -> None:
    first = InstanceLease(redis_client, "weatherlight", "token-a")
    second = InstanceLease(redis_client, "weatherlight", "token-b")
    assert await first.acquire() == "weatherlight-0"
    assert await second.acquire() == "weatherlight-1"
    # The same replica restarted (its old lease has not expired) gets its own name back.
    again = InstanceLease(redis_client, "weatherlight", "token-a")
    assert await again.acquire() == "weatherlight-0"
    await second.release()
    third = InstanceLease(redis_client, "weatherlight", "token-c")
    assert await third.acquire() == "weatherlight-1"  # the lowest free slot
    assert await InstanceLease(redis_client, "tamiyo", "token-a").acquire() == "tamiyo-0"


async def test_a_lost_lease_raises_on_renew(redis_client: aioredis.Redis) -> None:
    lease = InstanceLease(redis_client, "weatherlight", "token-a", ttl_ms=60_000)
    await lease.acquire()
    await lease.renew()
    # Another replica took the slot (say, after this process was frozen past its lease).
    await redis_client.hset(KeySpace().instances("weatherlight"), "0", "token-z|99999999999999")
    with pytest.raises(LeaseLost, match="weatherlight-0"):
        await lease.renew()
    await lease.release()  # releasing a slot someone else holds leaves it to them
    assert await redis_client.hget(KeySpace().instances("weatherlight"), "0") == b"token-z|99999999999999"


async def test_an_expired_lease_is_given_to_a_new_replica(redis_client: aioredis.Redis) -> None:
    key = KeySpace("esper").instances("svc")
    await redis_client.hset(key, "0", "gone|1")  # expired long ago
    lease = InstanceLease(redis_client, "svc", "new", keys=KeySpace("esper"), slots=2)
    assert await lease.acquire() == "svc-0"
    await InstanceLease(redis_client, "svc", "other", keys=KeySpace("esper"), slots=2).acquire()
    with pytest.raises(LeaseLost, match="all 2"):
        await InstanceLease(redis_client, "svc", "third", keys=KeySpace("esper"), slots=2).acquire()


def test_instance_token_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "var" / "instance.token"
    token = instance_token(path)
    assert len(token) == 32
    assert instance_token(path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
