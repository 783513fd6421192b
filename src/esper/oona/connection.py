"""The one place a bus connection pool is built from a URL.

Every pool the bus uses:

- parses replies with :mod:`esper.oona.wire_guard`, so no reply holds more
  than a bounded amount of entry data, whatever a writer put in a stream;
- has a socket timeout above the block time, so a blocking read is never cut
  off by its own socket;
- retries a command once, at once, when its connection turns out to be dead
  (after a server restart every pooled connection fails on first use). A
  command that did reach the old server may so run twice; for XADD that is a
  duplicate entry with the same nonce, which every reader's replay guard
  rejects, so no effect happens twice;
- blocks for a free connection instead of failing with "too many connections".
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from esper.oona.config import VALUE_MARGIN, StreamConfig
from esper.oona.wire_guard import bounded_parser


def connect(url: str, config: StreamConfig) -> aioredis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) configured as described above."""
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=config.max_connections,
        timeout=config.socket_timeout_s,
        decode_responses=False,
        protocol=2,  # the wire guard parses RESP2 (redis-py 8 would default to RESP3)
        socket_timeout=config.socket_timeout_s,
        socket_connect_timeout=5.0,
        retry=retry,
        parser_class=bounded_parser(config.max_payload_bytes + VALUE_MARGIN, config.max_read_bytes),
    )
    return aioredis.Redis(connection_pool=pool, retry=retry)
