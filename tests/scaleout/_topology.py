"""Scale-out topologies' parts: the Sentinel one, free cluster ports and the waits on server state.

Assembling a cluster and letting a replica sync have no event to wait on, so
``until`` polls the servers' own state with a deadline.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from esper.core.redis_server import RedisServer

SERVICE = "esper"


def cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) is free as well, both below 65536."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        try:
            for candidate in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def until(condition: Callable[[], bool], what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class SentinelTopology:
    primary: RedisServer
    replica: RedisServer
    sentinel: RedisServer

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}/0"

    def current_primary_port(self) -> int:
        client = redis.Redis(port=self.sentinel.port)
        try:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            return int(port)
        finally:
            client.close()

    def failover(self, limit_s: float = 30.0) -> int:
        """Ask the sentinel for a failover and wait until it names the new primary; its port."""
        old = self.current_primary_port()
        client = redis.Redis(port=self.sentinel.port)

        def accepted() -> bool:
            # The sentinel refuses (NOGOODSLAVE) until it has heard from the replica recently.
            try:
                client.execute_command("SENTINEL", "FAILOVER", SERVICE)
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc):
                    raise
                return False
            return True

        try:
            until(accepted, "the sentinel to accept a failover", limit_s)
        finally:
            client.close()
        until(lambda: self.current_primary_port() != old, "the sentinel to promote the replica", limit_s)
        new = self.current_primary_port()
        server = redis.Redis(port=new)
        try:
            until(lambda: server.info("replication")["role"] == "master", "the new primary", limit_s)
        finally:
            server.close()
        return new


def replica_synced(port: int) -> bool:
    client = redis.Redis(port=port)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()
