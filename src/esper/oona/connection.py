"""The one place a bus connection is built from a URL: standalone, Sentinel or Cluster.

``REDIS_URL`` forms:

- ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock``;
- ``redis+sentinel://[user:password@]host:port[,host:port...]/SERVICE[/db]``: the
  client asks the sentinels for SERVICE's primary and follows failovers (the
  password is the data nodes'; add ``?sentinel_password=...`` when the
  sentinels have their own, ``?ssl=true`` for TLS);
- ``redis+cluster://[user:password@]host:port[,host:port...]``: any nodes of a
  Redis Cluster; every bus key then carries one hash tag
  (:mod:`esper.oona.keys`), so multi-key scripts stay in one slot.

Every pool the bus uses:

- parses replies with :mod:`esper.oona.wire_guard`, so no reply holds more
  than a bounded amount of entry data, whatever a writer put in a stream;
- has a socket timeout above the block time, so a blocking read is never cut
  off by its own socket;
- retries a command once, at once, when its connection turns out to be dead
  (after a server restart every pooled connection fails on first use; after
  a failover the old primary's connections fail, and a Sentinel-managed one
  re-resolves the primary). A command that did reach the old server may so
  run twice; for XADD that is a duplicate entry with the same nonce, which
  every reader's replay guard rejects, so no effect happens twice;
- blocks for a free connection instead of failing with "too many connections"
  (standalone; Sentinel and Cluster pools size themselves per node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from esper.oona.config import VALUE_MARGIN, StreamConfig
from esper.oona.keys import CLUSTER_SCHEME, SENTINEL_SCHEME
from esper.oona.wire_guard import bounded_parser

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class MultiHostURL:
    """A ``redis+sentinel://`` or ``redis+cluster://`` URL taken apart (no validation of reachability)."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    service: str | None
    db: int
    options: dict[str, str]


def parse_multi_host(url: str) -> MultiHostURL:
    """Split a Sentinel or Cluster URL; ``ValueError`` names what is wrong (never the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise ValueError(f"not a {SENTINEL_SCHEME}:// or {CLUSTER_SCHEME}:// URL")
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    credentials, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    hosts = []
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{scheme} URL: each node must be host:port")
        hosts.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    service = parts[0] if parts else None
    if scheme == SENTINEL_SCHEME and not service:
        raise ValueError(
            f"{SENTINEL_SCHEME} URL: name the service, e.g. {SENTINEL_SCHEME}://host:26379/mymaster"
        )
    if scheme == CLUSTER_SCHEME and parts:
        raise ValueError(f"{CLUSTER_SCHEME} URL: a cluster has no database or service path")
    db_text = parts[1] if len(parts) > 1 else "0"
    if not db_text.isdigit() or len(parts) > 2:
        raise ValueError(f"{SENTINEL_SCHEME} URL: the path is /SERVICE[/db]")
    options = {key: values[-1] for key, values in parse_qs(query).items()}
    return MultiHostURL(scheme, tuple(hosts), username, password, service, int(db_text), options)


def connect(url: str, config: StreamConfig) -> aioredis.Redis:
    """A client for ``url`` configured as described in the module docstring.

    On Cluster the client is a ``RedisCluster``; it offers the same command API
    and is typed as ``Redis`` for the bus's code, which uses only single-slot
    commands and scripts.
    """
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    common: dict[str, Any] = {
        "decode_responses": False,
        "protocol": 2,  # the wire guard parses RESP2 (redis-py 8 would default to RESP3)
        "socket_timeout": config.socket_timeout_s,
        "socket_connect_timeout": 5.0,
        "retry": retry,
        "parser_class": bounded_parser(config.max_payload_bytes + VALUE_MARGIN, config.max_read_bytes),
    }
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        return _sentinel(parse_multi_host(url), config, common)
    if url.startswith(f"{CLUSTER_SCHEME}://"):
        return _cluster(parse_multi_host(url), config, common)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=config.max_connections, timeout=config.socket_timeout_s, **common
    )
    return aioredis.Redis(connection_pool=pool, retry=retry)


def _tls(parsed: MultiHostURL) -> dict[str, Any]:
    return {"ssl": True} if parsed.options.get("ssl", "").lower() in _TRUE else {}


def _sentinel(parsed: MultiHostURL, config: StreamConfig, common: dict[str, Any]) -> aioredis.Redis:
    sentinel_password = parsed.options.get("sentinel_password")
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0, **_tls(parsed)}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(parsed.hosts),
        sentinel_kwargs=sentinel_kwargs,
        username=parsed.username,
        password=parsed.password,
        db=parsed.db,
        **_tls(parsed),
        **common,
    )
    assert parsed.service is not None
    primary = sentinel.master_for(
        parsed.service, redis_class=aioredis.Redis, max_connections=config.max_connections
    )
    return cast(aioredis.Redis, primary)


def _cluster(parsed: MultiHostURL, config: StreamConfig, common: dict[str, Any]) -> aioredis.Redis:
    parser = common.pop("parser_class")
    cluster = RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
        username=parsed.username,
        password=parsed.password,
        max_connections=config.max_connections,
        **_tls(parsed),
        **common,
    )
    # RedisCluster takes no parser argument: give it to the keyword arguments every node's
    # connections are built from (the startup nodes' and the shared set for nodes found later).
    # Connections are opened lazily, so none exists yet.
    cluster.connection_kwargs["parser_class"] = parser
    for node in cluster.startup_nodes:
        node.connection_kwargs["parser_class"] = parser
    return cast(aioredis.Redis, cluster)
